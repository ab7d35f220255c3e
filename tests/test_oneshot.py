"""One-shot pruning with calibration: Wanda, SparseGPT, patterns, the layer-by-layer pass, OWL profiles."""

from __future__ import annotations

import weakref

import pytest
import torch

from sparse_nlp import SparsityConfig, WeightSparsity, from_pretrained, save_pretrained, sparsify
from sparse_nlp.config import ConfigError
from sparse_nlp.pruning import calibration
from sparse_nlp.pruning.masking import get_mask, masked_modules
from sparse_nlp.pruning.masks import num_pruned
from sparse_nlp.pruning.methods import LayerStats, get_method
from sparse_nlp.pruning.patterns import NM, Block, PatternError, Unstructured, parse_pattern
from sparse_nlp.pruning.profiles import outlier_ratio, owl_profile
from sparse_nlp.targets import is_transposed, linear_weight, select_modules

from .conftest import VOCAB, tiny_inputs, tiny_model

METHODS = ("magnitude", "wanda", "sparsegpt")


def correlated_layer(out_f: int = 32, in_f: int = 64, n: int = 1024, seed: int = 0):
    """A random layer and inputs with correlated features of very different scales."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5
    scales = torch.exp(torch.randn(in_f, generator=g))
    x = (
        torch.randn(n, in_f, generator=g) @ mix + 0.3 * torch.randn(n, in_f, generator=g)
    ) * scales  # (n, in)
    w = torch.randn(out_f, in_f, generator=g)  # (out, in)
    stats = LayerStats(sq_norm=(x * x).sum(0), hessian=x.t() @ x, count=n)
    return w, x, stats


def prune(method: str, w, stats, sparsity, pattern, scope="per-layer"):
    mask, new = get_method(method).prune_layer(w, sparsity, parse_pattern(pattern), scope, stats)
    return mask, (w * mask if new is None else new)


def id_batches(n: int = 8, length: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::2, length // 2 :] = 0  # half the samples padded: stats must skip those tokens
    return [{"input_ids": ids, "attention_mask": mask}]


# ---- patterns and budgets (pure, on one layer) ------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:8"])
def test_nm_groups_are_exact(method, pattern):
    w, _, stats = correlated_layer()
    p = parse_pattern(pattern)
    mask, new = prune(method, w, stats, p.sparsity, pattern)
    groups = mask.reshape(w.shape[0], -1, p.m)  # (out, groups, m)
    assert (groups.sum(-1) == p.n).all()
    assert (new[~mask] == 0).all()
    nonzero = (new != 0).reshape(w.shape[0], -1, p.m).sum(-1)
    assert (nonzero <= p.n).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["block:4x4", "block:1x4", "block:2x8"])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_block_masks_are_whole_blocks(method, pattern, sparsity):
    w, _, stats = correlated_layer()
    b = parse_pattern(pattern)
    mask, new = prune(method, w, stats, sparsity, pattern)
    blocks = mask.reshape(w.shape[0] // b.rows, b.rows, w.shape[1] // b.cols, b.cols).permute(0, 2, 1, 3)
    per_block = blocks.reshape(*blocks.shape[:2], -1).float().mean(-1)  # (br, bc), 0 or 1
    assert ((per_block == 0) | (per_block == 1)).all()
    n_blocks = per_block.numel()
    assert int((per_block == 0).sum()) == num_pruned(sparsity, n_blocks)
    assert (new[~mask] == 0).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scope", ["per-layer", "per-row"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_unstructured_sparsity_equals_target(method, scope, sparsity):
    w, _, stats = correlated_layer(out_f=24, in_f=40)
    mask, new = prune(method, w, stats, sparsity, "unstructured", scope)
    if scope == "per-row" or method == "wanda":  # wanda compares within rows by default (the paper's choice)
        assert ((~mask).sum(1) == num_pruned(sparsity, w.shape[1])).all()
    else:
        assert int((~mask).sum()) == num_pruned(sparsity, w.numel())
    assert (new[~mask] == 0).all()


def test_wanda_compares_rows_by_default():
    w, _, stats = correlated_layer()
    mask, _ = prune("wanda", w, stats, 0.5, "unstructured")
    assert ((~mask).sum(1) == w.shape[1] // 2).all()
    layer_mask, _ = get_method("wanda", {"comparison": "layer"}).prune_layer(
        w, 0.5, Unstructured(), "per-layer", stats
    )
    assert int((~layer_mask).sum()) == w.numel() // 2
    assert not torch.equal(layer_mask, mask)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8", "block:1x4"])
def test_reconstruction_error_sparsegpt_below_wanda_below_magnitude(pattern):
    w, x, stats = correlated_layer()
    sparsity = parse_pattern(pattern).sparsity if isinstance(parse_pattern(pattern), NM) else 0.5
    errors = {}
    for method in METHODS:
        _, new = prune(method, w, stats, sparsity, pattern)
        errors[method] = torch.linalg.norm(x @ w.t() - x @ new.t()).item()
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_sparsegpt_update_reconstructs_kept_weights():
    w, x, stats = correlated_layer()
    with_update, new = get_method("sparsegpt").prune_layer(w, 0.5, Unstructured(), "per-layer", stats)
    assert not torch.allclose(new[with_update], w[with_update])  # kept weights moved
    no_update = get_method("sparsegpt", {"update": False})
    mask, kept = no_update.prune_layer(w, 0.5, Unstructured(), "per-layer", stats)
    assert torch.equal(kept[mask], w[mask])
    err = lambda v: torch.linalg.norm(x @ w.t() - x @ v.t()).item()  # noqa: E731
    assert err(new) < err(kept)


def test_sparsegpt_bad_options_and_global_scope():
    with pytest.raises(ConfigError, match="percdamp"):
        get_method("sparsegpt", {"percdamp": 0})
    with pytest.raises(ConfigError, match="unknown option 'damp'"):
        get_method("sparsegpt", {"damp": 0.1})
    with pytest.raises(ConfigError, match="comparison"):
        get_method("wanda", {"comparison": "column"})


@pytest.mark.parametrize("bad", ["3:2", "2:0", "block:0x4", "0:4", "2:2", "block:4", "nm"])
def test_malformed_pattern_lists_accepted_forms(bad):
    with pytest.raises(PatternError, match="Accepted forms") as err:
        parse_pattern(bad)
    assert '"N:M"' in str(err.value) and "block:RxC" in str(err.value)
    with pytest.raises(ConfigError, match=r"weights\[0\]\.pattern.*Accepted forms"):
        SparsityConfig.from_dict({"weights": [{"method": "wanda", "sparsity": 0.5, "pattern": bad}]})


def test_patterns_parse():
    assert parse_pattern("2:4") == NM(2, 4) and parse_pattern(" block:4x4 ") == Block(4, 4)
    assert parse_pattern("unstructured") == Unstructured()


# ---- the calibrated pass on tiny models -------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,pattern", [("wanda", "unstructured"), ("sparsegpt", "2:4"), ("sparsegpt", "block:4x4")]
)
def test_every_family_prunes_exactly(family, method, pattern):
    model = tiny_model(family)
    before = {n: linear_weight(m).detach().clone() for n, m in select_modules(model, "all-linear").items()}
    sparsify(
        model,
        SparsityConfig(weights=[WeightSparsity(method=method, sparsity=0.5, pattern=pattern)]),
        data=id_batches(),
        progress=False,
    )
    masked = dict(masked_modules(model))
    assert set(masked) == set(before)
    for name, module in masked.items():
        w = linear_weight(module)
        assert int((w == 0).sum()) >= num_pruned(0.5, w.numel())
        mask_oi = get_mask(module).t() if is_transposed(module) else get_mask(module)
        assert int((~mask_oi).sum()) == num_pruned(0.5, w.numel())
        if method == "wanda":
            assert torch.equal(w[mask_oi], before[name][mask_oi])
    with torch.no_grad():
        out = model(**tiny_inputs())
    assert torch.isfinite(out.logits).all()


def test_sparsegpt_beats_magnitude_on_block_outputs():
    """Whole-model check: the calibrated methods keep the last hidden state closer to the dense one."""
    dense = tiny_model("llama", num_hidden_layers=3)
    batches = id_batches(n=16)
    with torch.no_grad():
        ref = dense(**batches[0], output_hidden_states=True).hidden_states[-1]
    errors = {}
    for method in METHODS:
        model = tiny_model("llama", num_hidden_layers=3)
        sparsify(
            model,
            SparsityConfig(weights=[WeightSparsity(method=method, sparsity=0.6)]),
            data=batches,
            progress=False,
        )
        with torch.no_grad():
            out = model(**batches[0], output_hidden_states=True).hidden_states[-1]
        errors[method] = torch.linalg.norm((out - ref)[batches[0]["attention_mask"].bool()]).item()
    assert errors["sparsegpt"] < errors["magnitude"], errors
    assert errors["wanda"] < errors["magnitude"], errors


@pytest.mark.parametrize("name", ["bert", "distilbert", "gpt2", "llama", "qwen2-mixed"])
def test_block_by_block_inputs_match_the_full_forward(name):
    """With nothing pruned, the stats the pass gathers from re-run blocks equal those of a full forward.

    This checks that the captured block arguments (attention mask, positions, rotary embeddings) are the
    model's own, including a Qwen2 with sliding-window and full-attention layers mixed.
    """
    if name == "qwen2-mixed":
        model = tiny_model(
            "qwen2",
            num_hidden_layers=3,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,
            layer_types=None,
        )
        assert len(set(model.config.layer_types)) > 1
    else:
        model = tiny_model(name)
    batches = id_batches()
    modules = select_modules(model, "all-linear")
    full = calibration._full_forward_stats(model, batches, modules, set(modules))
    walked = {}

    def per_block(i, collect):
        here = {n: m for n, m in modules.items() if f".{i}." in n}
        walked.update(collect(here, set(here)))

    calibration._walk_blocks(model, batches, per_block, desc="test", progress=False)
    assert set(walked) == set(full)
    for n in full:
        assert walked[n].count == full[n].count == int(batches[0]["attention_mask"].sum())
        torch.testing.assert_close(walked[n].sq_norm, full[n].sq_norm, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(walked[n].hessian, full[n].hessian, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("family_name", ["llama", "bert", "gpt2"])
def test_sparsegpt_match_dense_corrects_the_drift(family_name):
    """Refitting each layer to the dense model's outputs keeps the last hidden state closer to the dense one."""
    kw = {"n_layer": 4} if family_name == "gpt2" else {"num_hidden_layers": 4}
    batches = id_batches(n=16)
    real = batches[0]["attention_mask"].bool()
    with torch.no_grad():
        ref = tiny_model(family_name, **kw)(**batches[0], output_hidden_states=True).hidden_states[-1]
    errors = {}
    for match in (False, True):
        model = tiny_model(family_name, **kw)
        rule = WeightSparsity(method="sparsegpt", sparsity=0.6, options={"match_dense": match})
        sparsify(model, SparsityConfig(weights=[rule]), data=batches, progress=False)
        with torch.no_grad():
            out = model(**batches[0], output_hidden_states=True).hidden_states[-1]
        errors[match] = torch.linalg.norm((out - ref)[real]).item()
        assert all(
            1 - get_mask(m).float().mean().item() == pytest.approx(0.6, abs=0.01)
            for _, m in masked_modules(model)
        )
    assert errors[True] < errors[False], errors


@pytest.mark.parametrize("match_dense", [False, True])
def test_pass_holds_one_block_of_activations(monkeypatch, match_dense):
    live, peak, total = set(), [0], [0]

    def track(tensor):
        key = id(tensor)
        live.add(key)
        total[0] += 1
        peak[0] = max(peak[0], len(live))
        weakref.finalize(tensor, live.discard, key)
        return tensor

    monkeypatch.setattr(calibration, "_track", track)
    monkeypatch.setattr(calibration, "BATCH_SIZE", 4)
    layers = 6
    model = tiny_model("gpt2", n_layer=layers)
    batches = id_batches(n=12)  # 3 calibration batches of 4
    assert len(calibration.calibration_batches(batches)) == 3
    rule = WeightSparsity(method="sparsegpt", sparsity=0.5, options={"match_dense": match_dense})
    sparsify(model, SparsityConfig(weights=[rule]), data=batches, progress=False)
    copies = 2 if match_dense else 1  # match_dense carries the dense hidden states along
    assert total[0] == 3 * (
        1 + copies * layers
    )  # every captured input and block output went through the counter
    assert peak[0] <= copies * 3 + 1  # one block's activations (+ the one being produced), not all layers'


@pytest.mark.parametrize(
    "method,profile", [("wanda", "uniform"), ("sparsegpt", "uniform"), ("magnitude", "owl")]
)
def test_calibrated_methods_without_data_fail_clearly(method, profile):
    model = tiny_model("bert")
    with pytest.raises(ConfigError, match="needs calibration data"):
        sparsify(
            model, SparsityConfig(weights=[WeightSparsity(method=method, sparsity=0.5, profile=profile)])
        )
    assert not list(masked_modules(model))


def test_unusable_calibration_plans_fail_before_pruning():
    model = tiny_model("bert")
    with pytest.raises(ConfigError, match="global"):
        sparsify(
            model,
            SparsityConfig(weights=[WeightSparsity(method="wanda", sparsity=0.5, scope="global")]),
            data=id_batches(),
        )
    with pytest.raises(ConfigError, match="owl"):
        sparsify(
            model,
            {"weights": [{"method": "wanda", "pattern": "2:4", "sparsity": 0.5, "profile": "owl"}]},
            data=id_batches(),
        )
    with pytest.raises(ConfigError, match="tokenizer"):
        sparsify(model, SparsityConfig(weights=[WeightSparsity(method="wanda")]), data=["some text"])
    assert not list(masked_modules(model))


def test_calibration_from_texts_dataset_and_source(minilm_path, data_dir, monkeypatch):
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    texts = ["a fine film .", "the plot is thin and the acting worse .", "", "it works ."]
    batches = calibration.calibration_batches(texts, tok, num_samples=3, seq_len=5)
    # the first 3 texts: two truncated to 5 tokens, the empty one is [CLS] [SEP]
    assert sorted(int(b.sum()) for batch in batches for b in batch["attention_mask"]) == [2, 5, 5]
    ds = Dataset.from_dict({"sentence": texts, "label": [1, 0, 0, 1]})
    from_ds = calibration.calibration_batches(ds, tok, num_samples=3, seq_len=5)
    assert [b["input_ids"].tolist() for b in from_ds] == [b["input_ids"].tolist() for b in batches]
    monkeypatch.setenv("SPARSE_NLP_DATA_DIR", str(data_dir))
    sst2 = calibration.calibration_batches("sst2", tok, num_samples=10, seq_len=16)
    assert sum(b["input_ids"].shape[0] for b in sst2) == 10
    with pytest.raises(ConfigError, match="no text column"):
        calibration.calibration_batches(Dataset.from_dict({"label": [1]}), tok)

    model = tiny_model("bert", vocab_size=tok.vocab_size)
    sparsify(
        model,
        SparsityConfig(weights=[WeightSparsity(method="wanda", sparsity=0.5)]),
        data=texts,
        tokenizer=tok,
        progress=False,
    )
    assert len(list(masked_modules(model))) == 12


def test_owl_profile_keeps_the_total():
    profile = owl_profile([0.01, 0.05, 0.02, 0.03], [100, 100, 200, 100], 0.6, lam=0.08)
    assert abs(sum(s * n for s, n in zip(profile, [100, 100, 200, 100])) / 500 - 0.6) < 1e-9
    assert profile[1] < profile[3] < profile[2] < profile[0]  # more outliers -> less sparse
    assert max(profile) - min(profile) == pytest.approx(0.16)
    assert owl_profile([0.1, 0.1], [5, 5], 0.5) == [0.5, 0.5]
    assert outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 100.0])], m=2) == 0.25


@pytest.mark.parametrize("family_name", ["bert", "llama"])
def test_owl_sparsify_is_non_uniform_at_the_same_total(family_name):
    model = tiny_model(family_name, num_hidden_layers=4)
    with torch.no_grad():  # make the blocks differ in outliers
        for name in select_modules(model, "all-linear"):
            if ".2." in name:
                linear_weight(model.get_submodule(name))[:, :2] *= 20
    # per-layer comparison: its rounding stays below 1/numel per layer (per-row budgets round per 32-wide row)
    sparsify(
        model,
        SparsityConfig(
            weights=[
                WeightSparsity(method="wanda", sparsity=0.6, profile="owl", options={"comparison": "layer"})
            ]
        ),
        data=id_batches(),
        progress=False,
    )
    masks = {n: get_mask(m) for n, m in masked_modules(model)}
    per_layer = {n: 1 - m.float().mean().item() for n, m in masks.items()}
    assert max(per_layer.values()) - min(per_layer.values()) > 0.05
    total = sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert abs(total - 0.6) < 2e-3


@pytest.mark.parametrize("family_name", ["bert", "gpt2"])
def test_save_load_keeps_every_mask(tmp_path, family_name):
    model = tiny_model(family_name)
    sparsify(
        model,
        SparsityConfig(weights=[WeightSparsity(method="sparsegpt", sparsity=0.5, pattern="2:4")]),
        data=id_batches(),
        progress=False,
    )
    save_pretrained(model, tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m")
    before, after = dict(masked_modules(model)), dict(masked_modules(loaded))
    assert set(before) == set(after) and before
    for name in before:
        assert torch.equal(get_mask(before[name]), get_mask(after[name]))
        assert torch.equal(before[name].weight, after[name].weight)
    inputs = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, loaded(**inputs).logits)


def test_layers_outside_blocks_and_mixed_rules():
    """A head layer (regex target) is calibrated after the blocks; a magnitude rule rides along uncalibrated."""
    model = tiny_model("bert")
    config = SparsityConfig(
        weights=[
            WeightSparsity(method="wanda", sparsity=0.5, targets=["attention", r"re:pooler\.dense$"]),
            WeightSparsity(method="magnitude", sparsity=0.25, targets=["ffn"]),
        ]
    )
    sparsify(model, config, data=id_batches(), progress=False)
    masks = {n: get_mask(m) for n, m in masked_modules(model)}
    assert 1 - masks["bert.pooler.dense"].float().mean().item() == pytest.approx(0.5)
    assert 1 - masks["bert.encoder.layer.0.intermediate.dense"].float().mean().item() == pytest.approx(0.25)
    assert 1 - masks["bert.encoder.layer.1.attention.self.query"].float().mean().item() == pytest.approx(0.5)


def test_cli_sparsify_with_calibration(tmp_path, minilm_path, data_dir, capsys):
    from transformers import AutoTokenizer

    from sparse_nlp.cli import main

    tok = AutoTokenizer.from_pretrained(minilm_path)
    model = tiny_model("bert", head="base", vocab_size=tok.vocab_size)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "out"
    args = [
        "sparsify",
        str(tmp_path / "tiny"),
        "--method",
        "sparsegpt",
        "--pattern",
        "2:4",
        "--out",
        str(out),
    ]
    assert main(args) == 2  # no calibration data
    assert "needs calibration data" in capsys.readouterr().err
    calib = [
        "--calibration",
        "sst2",
        "--data-dir",
        str(data_dir),
        "--num-samples",
        "8",
        "--seq-len",
        "16",
        "--no-progress",
    ]
    assert main(args + calib) == 0
    loaded = from_pretrained(out)
    masks = {n: get_mask(m) for n, m in masked_modules(loaded)}
    assert len(masks) == 12
    for mask in masks.values():
        assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all()
