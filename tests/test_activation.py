"""Dynamic activation sparsity (TEAL, CATS): calibration, hooks, saving, family support, and the batch-1 kernel."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
import transformers

import sparse_nlp
from sparse_nlp import ActivationSparsity, SparsityConfig, WeightSparsity
from sparse_nlp.activation import (
    ActivationLinear,
    ExpertRowsLinear,
    accelerate,
    activation_state,
    check_activation,
    kernel,
    revert,
)
from sparse_nlp.activation.calibrate import Histogram, zero_fractions
from sparse_nlp.activation.experts import ExpertRouter, balanced_split
from sparse_nlp.errors import ConfigError, MetadataError, UnsupportedModelError
from sparse_nlp.targets import model_targets
from sparse_nlp.targets_docs import support_rows

from .conftest import ENCODERS, FAMILIES, VOCAB, tiny_inputs, tiny_model
from .test_families import MOE, NEW_FAMILIES, family_model, moe_model

ALL_FAMILIES = FAMILIES + NEW_FAMILIES


def id_data(seed: int, n: int = 32, length: int = 24) -> torch.Tensor:
    """(n, length) random token ids: calibration data of a tiny model."""
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def sparse(model, method: str = "teal", sparsity: float = 0.5, **kwargs):
    spec = ActivationSparsity(method=method, sparsity=sparsity, **kwargs)
    return sparse_nlp.sparsify(model, SparsityConfig(activation=spec), data=id_data(5), progress=False)


def measured(model, seed: int) -> float:
    """The fraction of zeros of the thresholded tensors on data the thresholds were not calibrated on."""
    state = activation_state(model)
    record = model.config.sparse_nlp["activation"]
    names = record.get("thresholds") or record.get("expert_maps")
    sites = {n: model.base_model.get_submodule(n) for n in names}
    where = "input" if state.where == "input" else "output"
    batches = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in id_data(seed).split(8)]
    return zero_fractions(model, sites, where, batches)[1]


# ---- calibration -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family,method,target",
    [
        ("llama", "teal", 0.25),
        ("llama", "teal", 0.5),
        ("llama", "cats", 0.5),
        ("bert", "teal", 0.4),
        ("llama", "moefication", 0.5),
        ("gpt2", "moefication", 0.75),
    ],
)
def test_thresholds_hit_the_target_on_held_back_data(family, method, target):
    options = {"experts": 8} if method == "moefication" else {}
    model = sparse(tiny_model(family), method, target, options=options)
    record = model.config.sparse_nlp["activation"]
    assert abs(record["measured"]["sparsity"] - target) < 0.02  # on the calibration data, all sites applied
    assert abs(record["measured"]["weight_weighted"] - target) < 0.02
    assert abs(measured(model, seed=99) - target) < 0.02  # on other data


def test_greedy_allocation_keeps_each_blocks_budget_and_varies_the_layers():
    model = tiny_model("llama")
    sparse(model, "teal", 0.5, options={"allocation": "greedy", "step": 0.1, "samples": 2})
    record = model.config.sparse_nlp["activation"]
    allocated = record["allocated"]
    for block in range(2):
        names = [n for n in allocated if n.startswith(f"layers.{block}.")]
        weights = {n: model.base_model.get_submodule(n).weight.numel() for n in names}
        mean = sum(allocated[n] * weights[n] for n in names) / sum(weights.values())
        assert mean == pytest.approx(0.5, abs=1e-6)
        assert len({allocated[n] for n in names}) > 1  # not uniform
    assert record["measured"]["weight_weighted"] == pytest.approx(0.5, abs=0.05)


def test_balanced_split_recovers_clusters_with_equal_sizes():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 5
    truth = torch.arange(40) % 4
    rows = centers[truth] + 0.1 * torch.randn(40, 16, generator=g)
    assign = balanced_split(rows, 4)
    assert torch.bincount(assign, minlength=4).tolist() == [10, 10, 10, 10]
    for e in range(4):  # each expert holds exactly one cluster
        assert len(set(truth[assign == e].tolist())) == 1
    assert torch.bincount(balanced_split(rows[:38], 4), minlength=4).tolist() == [10, 10, 9, 9]


def test_histogram_quantile_is_close_to_the_exact_one():
    values = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    hist = Histogram()
    hist.add(values)
    for q in (0.1, 0.5, 0.9):
        t = hist.threshold(q)
        assert float((values.abs() <= t).float().mean()) == pytest.approx(q, abs=0.002)
        assert hist.fraction_below(t) == pytest.approx(q, abs=0.002)
    assert hist.threshold(0.0) == 0.0


# ---- applying ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family,method",
    [
        ("llama", "teal"),
        ("llama", "cats"),
        ("bert", "teal"),
        ("llama", "moefication"),
        ("bert", "moefication"),
    ],
)
def test_zero_sparsity_equals_the_dense_model_exactly(family, method):
    model = tiny_model(family)
    inputs = tiny_inputs()
    dense = logits(model, inputs)
    sparse(model, method, 0.0)
    assert activation_state(model) is not None
    assert torch.equal(logits(model, inputs), dense)


def test_thresholds_change_the_outputs_and_to_dense_removes_them():
    model = tiny_model("llama")
    inputs = tiny_inputs()
    dense = logits(model, inputs)
    sparse(model, "teal", 0.5)
    assert not torch.allclose(logits(model, inputs), dense, atol=1e-4)
    sparse_nlp.to_dense(model)
    assert activation_state(model) is None
    assert torch.equal(logits(model, inputs), dense)


@pytest.mark.parametrize("method", ["teal", "cats", "moefication"])
def test_save_and_load_restore_identical_outputs(tmp_path, method):
    model = tiny_model("llama")
    options = {"experts": 8} if method == "moefication" else {}
    spec = ActivationSparsity(method=method, sparsity=0.4, options=options)
    config = SparsityConfig(weights=[WeightSparsity(method="wanda", sparsity=0.5)], activation=spec)
    sparse_nlp.sparsify(model, config, data=id_data(5), progress=False)
    inputs = tiny_inputs()
    before = logits(model, inputs)
    sparse_nlp.save_pretrained(model, tmp_path / "ck")
    loaded = sparse_nlp.from_pretrained(tmp_path / "ck")
    assert activation_state(loaded).thresholds == activation_state(model).thresholds
    assert torch.equal(logits(loaded, inputs), before)
    target = 0.375 if method == "moefication" else 0.4  # 5 of 8 experts kept
    assert sparse_nlp.report(loaded).activation["sparsity"] == pytest.approx(target, abs=0.02)


def test_plain_transformers_loads_the_dense_model_and_the_config_marks_it(tmp_path):
    model = tiny_model("llama")
    inputs = tiny_inputs()
    dense = logits(model, inputs)
    sparse(model, "teal", 0.5)
    sparse_nlp.save_pretrained(model, tmp_path / "ck")
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert torch.equal(logits(plain, inputs), dense)  # the dense model, not the thresholded one
    assert plain.config.sparse_nlp["activation"]["method"] == "teal"
    assert plain.config.sparse_nlp["activation"]["thresholds"]


def test_a_damaged_threshold_record_is_named_on_load(tmp_path):
    import json

    model = sparse(tiny_model("llama"), "teal", 0.5)
    sparse_nlp.save_pretrained(model, tmp_path / "ck")
    path = tmp_path / "ck" / "config.json"
    raw = json.loads(path.read_text())
    name = next(iter(raw["sparse_nlp"]["activation"]["thresholds"]))
    raw["sparse_nlp"]["activation"]["thresholds"][name] = -1.0
    path.write_text(json.dumps(raw))
    with pytest.raises(MetadataError, match="thresholds"):
        sparse_nlp.from_pretrained(tmp_path / "ck", check_hashes=False)


# ---- families and bad options ----------------------------------------------------------------------------


def _model(family: str):
    return tiny_model(family) if family in FAMILIES else family_model(family)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_family_accepts_teal_and_moefication_and_accepts_or_refuses_cats_clearly(family):
    model = _model(family)
    _, sites = check_activation(model, ActivationSparsity(method="teal"))
    assert sites
    _, sites = check_activation(model, ActivationSparsity(method="moefication", options={"experts": 4}))
    assert len(sites) == model.config.num_hidden_layers
    entry = model_targets(model)
    if entry.gated:
        _, sites = check_activation(model, ActivationSparsity(method="cats"))
        assert len(sites) == model.config.num_hidden_layers
        sparse(model, "cats", 0.5)
        assert abs(model.config.sparse_nlp["activation"]["measured"]["sparsity"] - 0.5) < 0.05
    else:
        with pytest.raises(UnsupportedModelError, match="needs a gated FFN.*use method 'teal'"):
            check_activation(model, ActivationSparsity(method="cats"))


@pytest.mark.parametrize("family", MOE)
def test_mixture_of_experts_families_accept_teal_and_refuse_ffn_methods_on_fused_experts(family):
    model = moe_model(family)
    _, sites = check_activation(model, ActivationSparsity(method="teal"))
    assert any("self_attn" in n for n in sites)
    for method in ("cats", "moefication"):
        spec = ActivationSparsity(method=method, options={"experts": 4} if method == "moefication" else {})
        if model_targets(model).ffn_out:  # a shared expert: a plain gated FFN beside the fused experts
            _, sites = check_activation(model, spec)
            assert all("shared_expert" in n for n in sites)
        else:
            with pytest.raises(UnsupportedModelError, match="fused mixture-of-experts"):
                check_activation(model, spec)


@pytest.mark.parametrize("family", ALL_FAMILIES + MOE)
def test_the_support_table_says_which_methods_each_family_accepts(family):
    model = _model(family) if family not in MOE else moe_model(family)
    cell = dict((t, c) for t, _, c in support_rows())[model.config.model_type]["activation"]
    claimed = set(cell.split(";")[0].removeprefix("yes: ").split(", "))
    accepted = set()
    for method in ("teal", "cats", "moefication"):
        try:
            check_activation(
                model,
                ActivationSparsity(method=method, options={"experts": 4} if method == "moefication" else {}),
            )
            accepted.add(method)
        except UnsupportedModelError:
            pass
    assert claimed == accepted


@pytest.mark.parametrize(
    "activation,match",
    [
        ({"sparsity": 1.0}, r"activation\.sparsity"),
        ({"method": "moe"}, r"activation\.method.*Known: cats, moefication, teal"),
        ({"options": {"allocation": "greed"}}, r"activation\.options\.allocation.*Did you mean 'greedy'"),
        ({"options": {"steps": 0.1}}, r"activation\.options\.steps is not an option"),
        ({"method": "cats", "options": {"allocation": "uniform"}}, r"not an option of 'cats'"),
        ({"targets": ["fnn"]}, r"activation\.targets\[0\].*Did you mean 'ffn'"),
        ({"method": "moefication", "options": {"experts": 4, "top_k": 5}}, r"top_k is 5, larger than"),
        ({"method": "moefication", "options": {"experts": 1}}, r"experts must be an integer >= 2"),
        ({"method": "moefication", "options": {"router": "mlp"}}, r"router must be one of similarity"),
    ],
)
def test_bad_options_fail_before_the_model_changes(activation, match):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = {"weights": [{"method": "magnitude", "sparsity": 0.5}], "activation": activation}
    with pytest.raises(ConfigError, match=match):
        sparse_nlp.sparsify(model, config, data=id_data(5), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert activation_state(model) is None and not hasattr(model.config, "sparse_nlp")


def test_every_bad_field_is_named_at_once():
    with pytest.raises(ConfigError) as err:
        SparsityConfig.from_dict({"activation": {"method": "tael", "sparsity": 2, "targets": ["x"]}})
    message = str(err.value)
    for field in ("activation.method", "activation.sparsity", "activation.targets[0]"):
        assert field in message


@pytest.mark.parametrize("family", ENCODERS[:1])
def test_a_refused_method_leaves_the_model_unchanged(family):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = SparsityConfig(
        weights=[WeightSparsity(method="magnitude", sparsity=0.5)],
        activation=ActivationSparsity(method="cats"),
    )
    with pytest.raises(UnsupportedModelError, match="gated FFN"):
        sparse_nlp.sparsify(model, config, data=id_data(5), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_activation_sparsity_needs_data():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="needs calibration data"):
        sparse_nlp.sparsify(model, SparsityConfig(activation=ActivationSparsity()), progress=False)
    assert activation_state(model) is None


# ---- the batch-1 kernel ----------------------------------------------------------------------------------------


def use_isa(monkeypatch, isa: str) -> None:
    """Skip without the native kernel; cap it to its portable path for ``isa == "portable"``."""
    if kernel.ops() is None:
        pytest.skip(f"native kernel unavailable: {kernel.status()}")
    if isa == "portable":
        monkeypatch.setenv(kernel.ENV_ISA, "portable")
        assert kernel.best_isa() == 0


@pytest.mark.parametrize("isa", ["portable", "native"])
@pytest.mark.parametrize("tokens,inp,out", [(1, 37, 53), (1, 64, 24), (3, 70, 19), (1, 5, 200)])
def test_kernel_equals_the_dense_product_of_the_zeroed_input(monkeypatch, isa, tokens, inp, out):
    use_isa(monkeypatch, isa)
    g = torch.Generator().manual_seed(tokens * inp + out)
    x = torch.randn(tokens, inp, generator=g)
    wt = torch.randn(inp, out, generator=g).contiguous()
    bias = torch.randn(out, generator=g)
    for threshold in (0.0, 0.7, 10.0):
        y = kernel.activation_linear(x, wt, bias, threshold)
        reference = torch.where(x.abs() > threshold, x, 0.0) @ wt + bias
        assert torch.allclose(y, reference, atol=1e-5, rtol=1e-5)
    y = kernel.activation_linear(x, wt, None, 0.5)
    assert torch.allclose(y, torch.where(x.abs() > 0.5, x, 0.0) @ wt, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("isa", ["portable", "native"])
@pytest.mark.parametrize(
    "tokens,inp,out,density",
    [
        (1, 37, 53, 0.5),
        (1, 64, 64, 0.3),
        (3, 70, 130, 0.5),
        (1, 5, 200, 0.1),
        (1, 576, 1536, 0.5),
        (2, 9, 1, 1.0),
    ],
)
def test_compressed_kernel_equals_the_dense_product_of_the_zeroed_input(
    monkeypatch, isa, tokens, inp, out, density
):
    use_isa(monkeypatch, isa)
    g = torch.Generator().manual_seed(tokens * inp + out)
    x = torch.randn(tokens, inp, generator=g)
    wt = torch.randn(inp, out, generator=g) * (torch.rand(inp, out, generator=g) < density)
    packed = kernel.compress(wt)
    assert torch.equal(packed.to_dense(), wt)
    assert packed.density == int((wt != 0).sum()) / wt.numel()
    bias = torch.randn(out, generator=g)
    for threshold in (0.0, 0.7, 10.0):
        y = kernel.masked_activation_linear(x, packed, bias, threshold)
        reference = (torch.where(x.abs() > threshold, x, 0.0).double() @ wt.double() + bias.double()).float()
        scale = max(1.0, float(reference.abs().max()))
        assert float((y - reference).abs().max()) <= 1e-5 * scale
    y = kernel.masked_activation_linear(x, packed, None, 0.5)
    assert torch.allclose(y, torch.where(x.abs() > 0.5, x, 0.0) @ wt, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("isa", ["portable", "native"])
@pytest.mark.parametrize("experts,size,inp", [(4, 96, 576), (3, 7, 37), (5, 1, 16), (2, 9, 8)])
def test_expert_rows_kernel_equals_the_rows_of_the_kept_experts(monkeypatch, isa, experts, size, inp):
    use_isa(monkeypatch, isa)
    g = torch.Generator().manual_seed(experts * size + inp)
    w, x = torch.randn(experts, size, inp, generator=g), torch.randn(inp, generator=g)
    bias = torch.randn(experts, size, generator=g)
    out = experts * size - 1  # one grouped row is padding: it holds the value `out`
    rows = torch.randperm(experts * size, generator=g).reshape(experts, size)
    for chosen in ([0], [experts - 1, 0], list(range(experts))):
        c = torch.tensor(chosen)
        for b in (None, bias):
            y = kernel.expert_rows(x, w, c, b, rows, out)
            dots = w[c].double() @ x.double() + (0.0 if b is None else b[c].double())  # (k, S)
            reference = torch.zeros(out + 1, dtype=torch.float64)
            reference[rows[c].reshape(-1)] = dots.reshape(-1)
            reference = reference[:out]
            assert y.shape == (out,)
            scale = max(1.0, float(reference.abs().max()))
            assert float((y.double() - reference).abs().max()) <= 1e-5 * scale
            assert int((y != 0).sum()) == int((reference != 0).sum())  # every other output stays zero
    with pytest.raises(RuntimeError, match="is not in"):
        kernel.expert_rows(x, w, torch.tensor([experts]), None, rows, out)


def test_compressed_kernel_refuses_mismatched_tensors():
    if kernel.ops() is None:
        pytest.skip(f"native kernel unavailable: {kernel.status()}")
    packed = kernel.compress(torch.randn(8, 70))
    op = kernel.ops().masked_activation_linear
    with pytest.raises(RuntimeError, match="x has 9 features, the weight 8"):
        op(torch.randn(1, 9), packed.bits, packed.offsets, packed.vals, None, 70, 0.0, 0)
    with pytest.raises(RuntimeError, match="2 chunks of 64 cannot hold 200 outputs"):
        op(torch.randn(1, 8), packed.bits, packed.offsets, packed.vals, None, 200, 0.0, 0)
    with pytest.raises(RuntimeError, match="offsets must be"):
        op(torch.randn(1, 8), packed.bits, packed.offsets.long(), packed.vals, None, 70, 0.0, 0)


def test_without_a_compiler_one_warning_and_the_dense_path(monkeypatch, caplog):
    monkeypatch.setenv("SPARSE_NLP_NATIVE", "0")
    kernel._reset()
    try:
        with caplog.at_level(logging.WARNING):
            assert kernel.ops() is None
            assert kernel.ops() is None
        warnings = [r for r in caplog.records if "activation-sparse kernel is unavailable" in r.message]
        assert len(warnings) == 1
        x, wt = torch.randn(1, 9), torch.randn(9, 4)
        y = kernel.activation_linear(x, wt, None, 0.3)
        assert torch.allclose(y, torch.where(x.abs() > 0.3, x, 0.0) @ wt)
    finally:
        kernel._reset()


@pytest.mark.parametrize("family,method", [("llama", "teal"), ("llama", "cats"), ("gpt2", "teal")])
def test_accelerated_layers_decode_like_the_hooks(family, method):
    model = sparse(tiny_model(family), method, 0.5)
    ids = tiny_inputs(batch=1, length=6)["input_ids"]
    with torch.no_grad():
        hooked_prefill = model(input_ids=ids).logits
        hooked_step = model(input_ids=ids[:, :1]).logits  # one token: the kernel path once accelerated
    count = accelerate(model)
    assert count > 0
    assert any(isinstance(m, ActivationLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, hooked_prefill, atol=1e-5)
        assert torch.allclose(model(input_ids=ids[:, :1]).logits, hooked_step, atol=1e-5)
    assert set(model.state_dict()) == set(tiny_model(family).state_dict())
    revert(model)
    assert not any(isinstance(m, ActivationLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, hooked_prefill)


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_accelerated_moefication_skips_experts_and_decodes_like_the_hooks(family):
    model = sparse(tiny_model(family), "moefication", 0.5, options={"experts": 4})
    inputs = tiny_inputs(batch=1, length=6)
    step = {k: v[:, :1] for k, v in inputs.items()}  # one token: the expert-skipping path once accelerated
    hooked_all, hooked_step = logits(model, inputs), logits(model, step)
    assert accelerate(model) > 0
    rows = [m for m in model.modules() if isinstance(m, ExpertRowsLinear)]
    assert rows and any(isinstance(m, ActivationLinear) for m in model.modules())
    assert torch.allclose(logits(model, inputs), hooked_all, atol=1e-5)
    assert torch.allclose(logits(model, step), hooked_step, atol=1e-5)
    # the first projection computes the kept experts' neurons only: every other output is an exact zero
    first = rows[0]
    x = torch.randn(1, 1, first.in_features)
    with torch.no_grad():
        y = first(x)
    experts = torch.zeros(first.router.experts, dtype=torch.bool)
    experts[first.router.choose(x.reshape(-1))] = True
    kept = experts[first.router.assign]
    assert int(kept.sum()) == first.out_features // 2  # 2 of 4 experts of equal size
    assert torch.all(y.reshape(-1)[~kept] == 0)
    assert torch.allclose(y.reshape(-1)[kept], first.original[0](x).reshape(-1)[kept], atol=1e-6)
    assert set(model.state_dict()) == set(tiny_model(family).state_dict())
    revert(model)
    assert not any(isinstance(m, ExpertRowsLinear | ActivationLinear) for m in model.modules())
    assert torch.equal(logits(model, inputs), hooked_all)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", [torch.nn.Identity(), torch.nn.Sigmoid()])  # act(0) = 0, and not
def test_expert_rows_equal_the_dense_rows_of_the_kept_experts_with_uneven_experts(bias, act):
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 10, bias=bias)
    assign = torch.tensor([2, 0, 1, 0, 2, 1, 0, 2, 0, 1])  # experts of 4, 3 and 3 neurons
    router = ExpertRouter(layer, act, assign, experts=3, top_k=2)
    fast = ExpertRowsLinear(layer, router, routes=True)
    for seed in range(5):
        x = torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            dense = layer(x)  # (the router hook on the original layer routes too)
            y = fast(x)
        kept = torch.zeros(3, dtype=torch.bool)
        kept[router.choose(x.reshape(-1))] = True
        keep = kept[assign]
        if (
            router.act_keeps_zero
        ):  # skipped neurons stay zero through act: the activation hook has nothing to do
            assert router.keep is None
        else:  # the activation hook zeroes act(0) of the skipped neurons
            assert torch.equal(router.keep.reshape(-1), keep)
        assert torch.allclose(y.reshape(-1), torch.where(keep, dense.reshape(-1), 0.0), atol=1e-6)
        assert torch.all(y.reshape(-1)[~keep] == 0)
    router.remove()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_accelerated_teal_on_a_pruned_model_reads_compressed_weights_and_decodes_like_the_hooks(family):
    model = tiny_model(family)
    config = SparsityConfig(
        weights=[WeightSparsity(method="magnitude", sparsity=0.5)],
        activation=ActivationSparsity(method="teal", sparsity=0.4),
    )
    sparse_nlp.sparsify(model, config, data=id_data(5), progress=False)
    ids = tiny_inputs(batch=1, length=6)["input_ids"]
    with torch.no_grad():
        hooked_all, hooked_step = model(input_ids=ids).logits, model(input_ids=ids[:, :1]).logits
    accelerate(model, compressed=True)
    layers = [m for m in model.modules() if isinstance(m, ActivationLinear)]
    assert layers and all(m.compressed and m.weight_t is None for m in layers)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, hooked_all, atol=1e-5)
        assert torch.allclose(model(input_ids=ids[:, :1]).logits, hooked_step, atol=1e-5)
    dense_layer = ActivationLinear(
        torch.nn.Linear(8, 4), 0.1, compressed=True
    )  # an unpruned weight stays dense
    assert not dense_layer.compressed and dense_layer.weight_t is not None
    pruned = torch.nn.Linear(64, 70)
    with torch.no_grad():
        pruned.weight.mul_(torch.rand(70, 64) < 0.5)
    assert not ActivationLinear(pruned, 0.1, compressed=False).compressed
    timed = ActivationLinear(pruned, 0.1)  # the faster kernel on this CPU: either way, the same product
    x = torch.randn(1, 64)
    with torch.no_grad():
        assert torch.allclose(
            timed(x), F.linear(torch.where(x.abs() > 0.1, x, 0.0), pruned.weight, pruned.bias), atol=1e-5
        )


def test_report_and_card_state_the_measured_activation_sparsity():
    from sparse_nlp.hub import render_model_card

    model = sparse(tiny_model("llama"), "teal", 0.4)
    summary = sparse_nlp.report(model).activation
    assert summary["method"] == "teal" and summary["tokens"] == 32 * 24
    assert summary["sparsity"] == model.config.sparse_nlp["activation"]["measured"]["sparsity"]
    assert "activation sparsity (teal" in str(sparse_nlp.report(model))
    card = str(render_model_card(model, "org/tiny"))
    assert f"{summary['sparsity'] * 100:.2f}% of their values were zero" in card
    assert "loads the **dense** model" in card
    assert sparse_nlp.report(tiny_model("llama")).activation is None
