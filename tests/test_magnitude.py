"""Magnitude pruning end to end: exact sparsity, zeros kept through training, targets, to_dense, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

import sparse_nlp
from sparse_nlp import ConfigError, SparsityConfig, TargetError, UnsupportedModelError, WeightSparsity
from sparse_nlp.pruning.masking import get_mask, masked_modules
from sparse_nlp.pruning.masks import num_pruned
from sparse_nlp.targets import linear_weight, model_targets, select_modules
from tests.conftest import FAMILIES, tiny_inputs, tiny_model


def _zeros(module) -> int:
    return int((module.weight == 0).sum())


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77])
def test_per_layer_sparsity_is_exact(family, sparsity):
    model = tiny_model(family)
    sparse_nlp.sparsify(model, SparsityConfig.magnitude(sparsity), progress=False)
    chosen = select_modules(model, ["all-linear"])
    assert chosen and dict(masked_modules(model)).keys() == chosen.keys()
    for module in chosen.values():
        assert _zeros(module) == num_pruned(sparsity, module.weight.numel())
        assert torch.equal(module.weight != 0, get_mask(module))


def test_pruned_entries_are_the_smallest(family):
    model = tiny_model(family)
    before = {n: linear_weight(m).detach().abs().clone() for n, m in select_modules(model, ["ffn"]).items()}
    sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.5, targets="ffn"), progress=False)
    for name, module in select_modules(model, ["ffn"]).items():
        kept = linear_weight(module) != 0
        assert before[name][~kept].max() <= before[name][kept].min()


def test_per_row_sparsity_is_exact_in_every_row():
    model = tiny_model("bert")
    sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.4, scope="per-row"), progress=False)
    for module in select_modules(model, ["all-linear"]).values():
        per_row = (module.weight == 0).sum(dim=1)
        assert torch.all(per_row == num_pruned(0.4, module.weight.shape[1]))


def test_global_sparsity_is_exact_over_all_layers_and_uneven_per_layer():
    model = tiny_model("gpt2")
    sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.6, scope="global"), progress=False)
    chosen = select_modules(model, ["all-linear"]).values()
    total = sum(m.weight.numel() for m in chosen)
    assert sum(_zeros(m) for m in chosen) == num_pruned(0.6, total)
    per_layer = {round(_zeros(m) / m.weight.numel(), 3) for m in chosen}
    assert len(per_layer) > 1  # a global budget is not a uniform one


def test_gpt2_conv1d_masks_follow_output_rows():
    # GPT-2 stores Conv1D weights as (in, out); per-row must mean per output neuron
    model = tiny_model("gpt2")
    sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.5, scope="per-row", targets="ffn"), progress=False)
    fc = model.transformer.h[0].mlp.c_fc  # (in=32, out=64)
    per_output = (fc.weight == 0).sum(dim=0)
    assert torch.all(per_output == num_pruned(0.5, 32))


@pytest.mark.parametrize("family_name", ["bert", "gpt2", "llama"])
def test_zeros_survive_adamw_with_weight_decay(family_name):
    model = tiny_model(family_name)
    model.train()
    sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.6), progress=False)
    pruned = {n: (m.weight == 0).clone() for n, m in masked_modules(model)}
    start = {n: m.weight.detach().clone() for n, m in masked_modules(model)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    batch = tiny_inputs(batch=4, length=10)
    labels = batch["input_ids"] if family_name != "bert" else torch.tensor([0, 1, 1, 0])
    for _ in range(20):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, module in masked_modules(model):
        assert torch.all(module.weight[pruned[name]] == 0.0), name
        assert not torch.equal(module.weight, start[name])  # training did move the kept weights
    # and the optimizer state of pruned entries never moved
    for name, module in masked_modules(model):
        state = optimizer.state[module.weight]
        assert torch.all(state["exp_avg"][pruned[name]] == 0.0), name


def test_deepcopy_keeps_masks_once_tracked():
    model = tiny_model("bert")
    sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.5), progress=False)
    clone = copy.deepcopy(model)
    assert sparse_nlp.pruning.masking.track_masks(clone) == 12
    optimizer = torch.optim.SGD(clone.parameters(), lr=0.1, weight_decay=0.1)
    clone.train()
    clone(**tiny_inputs(), labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    for _, module in masked_modules(clone):
        assert torch.all(module.weight[~module.weight_mask] == 0)


def test_targets_groups_regex_and_exclude():
    model = tiny_model("llama")
    entry = model_targets(model)
    ffn = select_modules(model, ["ffn"])
    assert len(ffn) == 2 * len(entry.ffn_linears)
    attn = select_modules(model, ["attention"], exclude=[r"\.o_proj$"])
    assert len(attn) == 2 * 3 and not any(n.endswith("o_proj") for n in attn)
    only_q = select_modules(model, [r"re:layers\.1\.self_attn\.q_proj$"])
    assert list(only_q) == ["model.layers.1.self_attn.q_proj"]
    sparse_nlp.sparsify(
        model, SparsityConfig(weights=[WeightSparsity(targets=["ffn"], sparsity=0.5)]), progress=False
    )
    assert {n for n, _ in masked_modules(model)} == set(ffn)


def test_to_dense_removes_every_trace():
    model = tiny_model("bert")
    sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.5), progress=False)
    sparse_nlp.to_dense(model)
    assert list(masked_modules(model)) == []
    assert not hasattr(model.config, "sparse_nlp")
    assert all("weight_mask" not in m._buffers for m in model.modules())
    # zeros are no longer enforced: an optimizer step moves them
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(**tiny_inputs(), labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    ffn = model.bert.encoder.layer[0].intermediate.dense
    assert (ffn.weight == 0).float().mean() < 0.1
    assert "sparse_nlp" not in model.config.to_json_string()


def test_sparsify_records_metadata_and_merges_rules():
    model = tiny_model("bert")
    sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.5, targets="ffn"), progress=False)
    sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.25, targets="attention"), progress=False)
    meta = model.config.sparse_nlp
    assert [w["targets"] for w in meta["config"]["weights"]] == [["ffn"], ["attention"]]
    assert len(meta["masked_modules"]) == 12
    with pytest.raises(ConfigError, match="already pruned"):
        sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.5, targets="ffn"), progress=False)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        ({"weights": [{"method": "nope"}]}, ConfigError, "unknown pruning method 'nope'"),
        ({"weights": [{"sparsity": 1.0}]}, ConfigError, r"sparsity must be in \[0, 1\)"),
        (
            {"weights": [{"targets": ["re:no_such_layer"]}]},
            TargetError,
            "'re:no_such_layer' matches no Linear layer",
        ),
        ({"weights": [{"pattern": "2:0"}]}, ConfigError, "Accepted forms"),
        (
            {"weights": [{"targets": ["ffn"]}, {"targets": ["all-linear"]}]},
            ConfigError,
            r"weights\[1\] selects .* which weights\[0\] already prunes",
        ),
    ],
)
def test_bad_input_changes_nothing(config, error, message):
    model = tiny_model("bert")
    before = _snapshot(model)
    with pytest.raises(error, match=message):
        sparse_nlp.sparsify(model, config, progress=False)
    after = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not hasattr(model.config, "sparse_nlp") and list(masked_modules(model)) == []


def test_unknown_model_type_is_named():
    import transformers

    # outside the table, and no layout can be inferred: each decoder block holds two attentions
    model = transformers.T5ForConditionalGeneration(
        transformers.T5Config(d_model=16, num_layers=1, num_heads=2, d_ff=32, vocab_size=50)
    )
    with pytest.raises(UnsupportedModelError, match=r"cannot infer the layout of model_type 't5'"):
        sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.5), progress=False)


def test_report_counts_measured_zeros(family):
    model = tiny_model(family)
    sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.5, targets="ffn"), progress=False)
    result = sparse_nlp.report(model)
    assert result.groups["ffn"].sparsity == pytest.approx(0.5, abs=1e-9)
    assert result.groups["attention"].sparsity < 0.01
    assert {r.group for r in result.rows} >= {"attention", "ffn"}
    assert all(r.masked == (r.group == "ffn") for r in result.rows)
    text = str(result)
    assert "ffn" in text and "50.00%" in text
    assert result.to_dict()["groups"]["ffn"]["sparsity"] == pytest.approx(0.5)


def test_all_families_are_in_the_table():
    for family_name in FAMILIES:
        assert model_targets(family_name).ffn_linears


def test_attention_pattern_the_family_cannot_use_fails_before_pruning():
    model = tiny_model("gpt2")
    before = _snapshot(model)
    config = {
        "weights": [{"sparsity": 0.5}],
        "attention": {"pattern": "sliding_window", "options": {"window": 4}},
    }
    with pytest.raises(ConfigError, match="bidirectional"):
        sparse_nlp.sparsify(model, config, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert list(masked_modules(model)) == []


def test_tied_lm_head_is_refused_not_pruned_with_the_embeddings():
    model = tiny_model("gpt2", head="causal-lm")
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied by default
    before = _snapshot(model)
    with pytest.raises(TargetError, match=r"lm_head.weight is tied to the input embeddings"):
        sparse_nlp.sparsify(model, {"weights": [{"targets": ["re:lm_head"]}]}, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # excluding it works
    sparse_nlp.sparsify(
        model,
        {"weights": [{"targets": ["all-linear", "re:lm_head"], "exclude": ["lm_head$"]}]},
        progress=False,
    )


def test_report_counts_every_tensor_of_blocks_read_one_at_a_time(monkeypatch):
    """Blocks read from disk are freed before the next is read; a reused address is not a tied weight."""
    import importlib

    # sparse_nlp.report is also the name of a function the package exports
    report_module = importlib.import_module("sparse_nlp.report")
    model = tiny_model("llama")
    expected = sum(p.numel() for p in model.parameters())
    layers = model.model.layers

    def walk(model):
        # what sequential onloading does: each layer gets fresh tensors while it is walked, freed after
        saved = {}
        for name, module in model.named_modules():
            if name.startswith("model.layers.") and module is not layers and name.count(".") >= 2:
                for pname, p in list(module.named_parameters(recurse=False)):
                    saved[(name, pname)] = p
                    setattr(module, pname, torch.nn.Parameter(p.detach().clone()))
                yield name, module
                for pname, _ in list(module.named_parameters(recurse=False)):
                    setattr(module, pname, saved.pop((name, pname)))
            else:
                yield name, module

    monkeypatch.setattr(report_module, "named_modules_onloaded", walk)
    assert report_module.report(model).groups["model"].numel == expected
