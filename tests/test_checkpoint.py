"""Save -> load: same masks, bit-identical logits, plain transformers loads it too, damaged metadata is named."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import sparse_nlp
from sparse_nlp import CheckpointError, MetadataError, SparsityConfig
from sparse_nlp.checkpoint import MASKS_FILE
from sparse_nlp.pruning.masking import masked_modules
from tests.conftest import DECODERS, tiny_inputs, tiny_model


def _logits(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def _masks(model):
    return {n: m.weight_mask.clone() for n, m in masked_modules(model)}


def test_round_trip_all_families(family, tmp_path):
    model = tiny_model(family)
    sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.5, scope="per-row"), progress=False)
    inputs = tiny_inputs()
    expected = _logits(model, inputs)
    sparse_nlp.save_pretrained(model, tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} >= {"config.json", "model.safetensors", MASKS_FILE}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.tmp")]  # temp folder cleaned

    loaded = sparse_nlp.from_pretrained(tmp_path / "ckpt")
    assert type(loaded) is type(model)
    assert torch.equal(_logits(loaded, inputs), expected)
    original, restored = _masks(model), _masks(loaded)
    assert original.keys() == restored.keys() and original
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert (
        sparse_nlp.report(loaded).groups["linear"].nonzeros
        == sparse_nlp.report(model).groups["linear"].nonzeros
    )

    # plain transformers reads the same folder as an ordinary model with the same outputs
    auto = (
        transformers.AutoModelForCausalLM
        if family in DECODERS
        else transformers.AutoModelForSequenceClassification
    )
    plain = auto.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(_logits(plain, inputs), expected)
    assert list(masked_modules(plain)) == []


def test_loaded_masks_keep_zeros_in_training(tmp_path):
    model = tiny_model("llama")
    sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.7), progress=False)
    sparse_nlp.save_pretrained(model, tmp_path)
    loaded = sparse_nlp.from_pretrained(tmp_path)
    loaded.train()
    optimizer = torch.optim.AdamW(loaded.parameters(), lr=1e-2, weight_decay=0.01)
    batch = tiny_inputs()
    for _ in range(3):
        loaded(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for _, module in masked_modules(loaded):
        assert torch.all(module.weight[~module.weight_mask] == 0)


def test_masks_come_back_exactly_even_where_a_kept_weight_is_zero(tmp_path):
    model = tiny_model("bert")
    sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.5, targets="ffn"), progress=False)
    module = model.bert.encoder.layer[0].intermediate.dense
    kept = module.weight_mask.nonzero()[0]
    with torch.no_grad():
        module.weight[tuple(kept)] = 0.0  # a kept weight that happens to be zero
    sparse_nlp.save_pretrained(model, tmp_path)
    loaded = sparse_nlp.from_pretrained(tmp_path)
    assert torch.equal(loaded.bert.encoder.layer[0].intermediate.dense.weight_mask, module.weight_mask)


def test_plain_save_pretrained_checkpoint_takes_masks_from_the_zeros(tmp_path):
    # what Trainer checkpoints are: model.save_pretrained writes our metadata but no mask file
    model = tiny_model("gpt2")
    sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.5), progress=False)
    model.save_pretrained(tmp_path)
    assert not (tmp_path / MASKS_FILE).exists()
    loaded = sparse_nlp.from_pretrained(tmp_path)
    assert {n for n, _ in masked_modules(loaded)} == {n for n, _ in masked_modules(model)}


def test_head_and_base_classes_share_a_checkpoint(tmp_path):
    model = tiny_model("bert")
    sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.5), progress=False)
    sparse_nlp.save_pretrained(model, tmp_path)
    base = sparse_nlp.from_pretrained(tmp_path, transformers.AutoModel)
    assert type(base).__name__ == "BertModel"
    assert len(list(masked_modules(base))) == len(list(masked_modules(model)))


def test_save_over_an_earlier_checkpoint_replaces_it(tmp_path):
    model = tiny_model("bert")
    sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.5), progress=False)
    sparse_nlp.save_pretrained(model, tmp_path)
    sparse_nlp.to_dense(model)
    sparse_nlp.save_pretrained(model, tmp_path)
    assert not (tmp_path / MASKS_FILE).exists()
    assert "sparse_nlp" not in json.loads((tmp_path / "config.json").read_text())


def _saved(tmp_path):
    model = tiny_model("bert")
    sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.5), progress=False)
    sparse_nlp.save_pretrained(model, tmp_path)
    return tmp_path


def _edit_meta(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.__setitem__("sparse_nlp", "oops"), r"config.json.*must be a JSON object"),
        (lambda c: c["sparse_nlp"].pop("format_version"), r"config.json.*no integer 'format_version'"),
        (
            lambda c: c["sparse_nlp"].__setitem__("format_version", 99),
            r"config.json.*format_version 99, newer.*pip install -U",
        ),
        (
            lambda c: c["sparse_nlp"]["config"]["weights"][0].__setitem__("sparsity", 2),
            r"config.json.*sparsity must be in",
        ),
        (
            lambda c: c["sparse_nlp"]["config"]["weights"][0].__setitem__("method", "evil.module"),
            r"unknown pruning method 'evil.module'",
        ),
        (lambda c: c["sparse_nlp"].__setitem__("masked_modules", "all"), r"masked_modules must be a list"),
    ],
)
def test_malformed_metadata_is_named(tmp_path, edit, message):
    path = _saved(tmp_path)
    _edit_meta(path, edit)
    with pytest.raises(MetadataError, match=message):
        sparse_nlp.from_pretrained(path)


def test_metadata_naming_a_module_the_model_lacks(tmp_path):
    path = _saved(tmp_path)
    _edit_meta(path, lambda c: c["sparse_nlp"]["masked_modules"].append("encoder.layer.9.output.dense"))
    with pytest.raises(CheckpointError, match=r"lists masked module 'encoder.layer.9.output.dense'"):
        sparse_nlp.from_pretrained(path)


def test_damaged_mask_file_is_named(tmp_path):
    path = _saved(tmp_path)
    (path / MASKS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=MASKS_FILE):
        sparse_nlp.from_pretrained(path)


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sparse_nlp.from_pretrained(tmp_path / "nowhere" / "at" / "all")
    with pytest.raises(CheckpointError, match=r"config.json: missing"):
        sparse_nlp.from_pretrained(tmp_path)


def test_config_overrides_such_as_num_labels(tmp_path):
    model = tiny_model("bert", head="base")
    sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.5), progress=False)
    sparse_nlp.save_pretrained(model, tmp_path)
    loaded = sparse_nlp.from_pretrained(
        tmp_path, transformers.AutoModelForSequenceClassification, num_labels=3
    )
    assert loaded.classifier.out_features == 3 and loaded.config.num_labels == 3
    assert len(list(masked_modules(loaded))) == len(list(masked_modules(model)))
