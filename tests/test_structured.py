"""Structured removal of heads and FFN neurons: equivalence with zeroed units, budgets, GQA, scores, schedule."""

from __future__ import annotations

import copy

import pytest
import torch

from sparse_nlp.config import ConfigError, SparsityConfig, StructuredSparsity
from sparse_nlp.registry import STRUCTURED_SCORES, RegistryError
from sparse_nlp.sparsify import sparsify
from sparse_nlp.structured import (
    EmptyAttention,
    MovementTracker,
    StructuredError,
    apply_structured,
    keep_heads,
    model_layout,
    remove_units,
    select_units,
    zero_units,
)
from sparse_nlp.structured.recovery import RecoveryConfig, cubic_fraction, gradual_structured_prune
from sparse_nlp.structured.scores import gradient_unit_sums, weight_norm_scores
from sparse_nlp.targets import linear_weight, model_targets
from tests.conftest import DECODERS, labelled_batches, tiny_inputs, tiny_model


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _units(model):
    lay = model_layout(model)
    return [(x.num_heads, x.num_kv_heads, x.ffn) for x in lay]


@pytest.mark.parametrize("all_heads_layer", [None, 1])
def test_removal_equals_zeroed_dense(family, all_heads_layer):
    model = tiny_model(family)
    ref = copy.deepcopy(model)
    units = model_layout(model)[0].head_units
    heads = {0: [units - 1]}
    if all_heads_layer is not None:
        heads[all_heads_layer] = list(range(units))
    ffn_total = model_layout(model)[0].ffn
    ffn = {0: [0, 3, 7], 1: list(range(0, ffn_total, 2))}
    zero_units(ref, heads, ffn)
    remove_units(model, heads, ffn)
    inputs = tiny_inputs()
    torch.testing.assert_close(_logits(model, inputs), _logits(ref, inputs), rtol=1e-5, atol=1e-5)
    layout = model_layout(model)
    assert layout[0].head_units == units - 1
    assert layout[0].ffn == ffn_total - 3
    assert layout[1].ffn == ffn_total - len(range(0, ffn_total, 2))
    entry = model_targets(model)
    attention = model.base_model.get_submodule(f"{entry.layers}.1.{entry.attention}")
    assert isinstance(attention, EmptyAttention) == (all_heads_layer == 1)


def test_removed_model_trains(family):
    model = tiny_model(family)
    remove_units(model, {1: list(range(model_layout(model)[1].head_units))}, {0: [1, 2]})
    model.train()
    inputs = tiny_inputs()
    labels = inputs["input_ids"] if family in DECODERS else torch.tensor([0, 1])
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_gqa_groups_removed_consistently(family):
    model = tiny_model(family)  # 4 query heads, 2 key/value heads, head_dim 8
    layer = model.model.layers[0]
    q = layer.self_attn.q_proj.weight.detach().clone()
    k = layer.self_attn.k_proj.weight.detach().clone()
    o = layer.self_attn.o_proj.weight.detach().clone()
    assert model_layout(model)[0].head_units == 2 and model_layout(model)[0].group_size == 2
    keep_heads(model, 0, [1])  # keep KV group 1: kv head 1 and query heads 2, 3
    hd = 8
    assert torch.equal(layer.self_attn.q_proj.weight, q[2 * hd : 4 * hd])
    assert torch.equal(layer.self_attn.k_proj.weight, k[hd : 2 * hd])
    assert torch.equal(layer.self_attn.o_proj.weight, o[:, 2 * hd : 4 * hd])
    assert layer.self_attn.num_key_value_groups == 2
    lay = model_layout(model)[0]
    assert (lay.num_heads, lay.num_kv_heads) == (2, 1)


def test_gpt2_fused_qkv_slices():
    model = tiny_model("gpt2")  # 4 heads x 8, c_attn Conv1D weight (in 32, out 96)
    attn = model.transformer.h[0].attn
    w = attn.c_attn.weight.detach().clone()
    keep_heads(model, 0, [0, 3])
    cols = [*range(0, 8), *range(24, 32)]
    expect = torch.cat([w[:, cols], w[:, [32 + c for c in cols]], w[:, [64 + c for c in cols]]], dim=1)
    assert torch.equal(attn.c_attn.weight, expect)
    assert (attn.num_heads, attn.split_size, attn.c_attn.nf, attn.c_proj.nx) == (2, 16, 48, 16)


@pytest.mark.parametrize("scope", ["per-layer", "global"])
def test_budget_shapes(family, scope):
    model = tiny_model(family)
    before = model_layout(model)
    cfg = StructuredSparsity(heads=0.5, ffn=0.25, score="weight-norm", scope=scope)
    apply_structured(model, cfg, progress=False)
    after = model_layout(model)
    heads0 = sum(x.head_units for x in before)
    ffn0 = sum(x.ffn for x in before)
    if scope == "per-layer":
        for b, a in zip(before, after):
            assert a.head_units == b.head_units - int(0.5 * b.head_units + 0.5)
            assert a.ffn == b.ffn - int(0.25 * b.ffn + 0.5)
    assert sum(x.head_units for x in after) == heads0 - int(0.5 * heads0 + 0.5)
    assert sum(x.ffn for x in after) == ffn0 - int(0.25 * ffn0 + 0.5)
    record = model.config.sparse_nlp["structured"]
    assert [layer["ffn"] for layer in record["layers"]] == [x.ffn for x in after]
    _logits(model, tiny_inputs())  # still runs


def test_select_units_pure():
    scores = {0: torch.tensor([5.0, 1.0, 3.0, 2.0]), 1: torch.tensor([0.1, 0.2, 0.3, 0.4])}
    assert select_units(scores, 0.5, "per-layer") == {0: [1, 3], 1: [0, 1]}
    # global without normalisation: the four lowest overall are all in layer 1
    assert select_units(scores, 0.5, "global", normalize=False) == {0: [], 1: [0, 1, 2, 3]}
    assert select_units(scores, 0.5, "global", normalize=False, min_keep=1) == {0: [1], 1: [0, 1, 2]}
    # with per-layer L2 normalisation layer 1's scores are comparable to layer 0's
    norm = select_units(scores, 0.5, "global")
    assert sum(len(v) for v in norm.values()) == 4 and norm[0] and norm[1]
    with pytest.raises(ValueError, match="scope"):
        select_units(scores, 0.5, "sideways")


def test_weight_norm_scores_by_hand():
    model = tiny_model("bert")
    scores = weight_norm_scores(model)
    layer = model.bert.encoder.layer[1]
    hd = 8
    rows = slice(2 * hd, 3 * hd)  # head 2
    sq = sum(
        m.weight[rows].pow(2).sum()
        for m in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value)
    )
    sq = sq + layer.attention.output.dense.weight[:, rows].pow(2).sum()
    torch.testing.assert_close(scores.heads[1][2], sq.sqrt().detach())
    ffn_sq = layer.intermediate.dense.weight[5].pow(2).sum() + layer.output.dense.weight[:, 5].pow(2).sum()
    torch.testing.assert_close(scores.ffn[1][5], ffn_sq.sqrt().detach())


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_taylor_sum_equals_gate_gradient(family):
    """sum(w * grad) over a unit's output-projection weights is dL/dgate of a gate on that unit."""
    model = tiny_model(family)
    model.zero_grad()
    entry = model_targets(model)
    block = model.base_model.get_submodule(entry.layers)[0]
    o = block.get_submodule(entry.o)
    down = block.get_submodule(entry.ffn_out)
    lay = model_layout(model)[0]
    head_gate = torch.ones(lay.num_heads, requires_grad=True)
    ffn_gate = torch.ones(lay.ffn, requires_grad=True)
    h1 = o.register_forward_pre_hook(lambda m, a: (a[0] * head_gate.repeat_interleave(lay.head_dim),))
    h2 = down.register_forward_pre_hook(lambda m, a: (a[0] * ffn_gate,))
    inputs = tiny_inputs()
    labels = inputs["input_ids"] if family in DECODERS else torch.tensor([0, 1])
    model(**inputs, labels=labels).loss.backward()
    h1.remove()
    h2.remove()
    sums = gradient_unit_sums(model)
    gate = head_gate.grad.reshape(lay.head_units, lay.group_size).sum(1)
    torch.testing.assert_close(sums.heads[0], gate, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sums.ffn[0], ffn_gate.grad, rtol=1e-4, atol=1e-6)


def test_taylor_apply_with_texts_and_batches():
    model = tiny_model("llama")
    batches = [tiny_inputs(seed=s) for s in range(3)]
    cfg = StructuredSparsity(heads=0.5, ffn=0.5, score="taylor", options={"num_batches": 3})
    apply_structured(model, cfg, data=batches, progress=False)
    assert sum(x.head_units for x in model_layout(model)) == 2
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="needs data"):
        apply_structured(tiny_model("bert"), cfg, progress=False)


def test_registry_and_config_errors():
    assert {"weight-norm", "taylor", "movement"} <= set(STRUCTURED_SCORES.names())
    with pytest.raises(RegistryError, match="taylor"):
        apply_structured(tiny_model("bert"), StructuredSparsity(heads=0.5, score="talyor"), progress=False)
    with pytest.raises(ConfigError, match="structured.score"):
        SparsityConfig(structured=StructuredSparsity(heads=0.5, score="talyor")).validate()
    with pytest.raises(ConfigError, match="structured.options"):
        apply_structured(
            tiny_model("bert"), StructuredSparsity(heads=0.5, options={"num_batch": 2}), progress=False
        )
    with pytest.raises(StructuredError, match="layer 0 heads"):
        keep_heads(tiny_model("bert"), 0, [0, 9])


def test_sparsify_with_structured_and_weights():
    model = tiny_model("bert")
    config = SparsityConfig(structured=StructuredSparsity(heads=0.25, ffn=0.5, score="weight-norm"))
    config.weights = SparsityConfig.magnitude(0.5, targets="ffn").weights
    sparsify(model, config, progress=False)
    meta = model.config.sparse_nlp
    assert meta["structured"]["layers"][0]["ffn"] + meta["structured"]["layers"][1]["ffn"] == 64
    assert meta["config"]["structured"]["ffn"] == 0.5
    down = model.bert.encoder.layer[0].output.dense
    assert linear_weight(down).shape[1] == meta["structured"]["layers"][0]["ffn"]
    assert float((down.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02)


def test_decoder_generate_with_empty_layer():
    model = tiny_model("llama")
    ref = copy.deepcopy(model)
    heads = {0: [0, 1]}
    zero_units(ref, heads)
    remove_units(model, heads)
    ids = tiny_inputs(batch=1, pad=False)["input_ids"]
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    expect = ref.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, expect)


def test_gradual_schedule_reaches_budget():
    assert cubic_fraction(0.6, 3, 3) == pytest.approx(0.6)
    assert cubic_fraction(0.6, 1, 3) > 0.6 / 3  # front-loaded
    teacher = tiny_model("bert")
    student = copy.deepcopy(teacher)

    batches = labelled_batches

    target = StructuredSparsity(heads=0.5, ffn=0.5, score="taylor")
    cfg = RecoveryConfig(stages=2, steps_per_stage=2, final_steps=1, score_batches=2)
    log = gradual_structured_prune(student, teacher, batches(), target, cfg)
    layout = model_layout(student)
    assert sum(x.head_units for x in layout) == 4 and sum(x.ffn for x in layout) == 64
    assert [e["head_units"] for e in log if "stage" in e] == [
        8 - int(0.5 * 8 * cubic_fraction(1, 1, 2) + 0.5),
        4,
    ]
    assert student.config.sparse_nlp["structured"]["layers"][0]["ffn"] == layout[0].ffn


def test_movement_tracker_accumulates_negative_w_grad():
    model = tiny_model("bert")
    tracker = MovementTracker(model)
    with pytest.raises(ValueError, match="never called"):
        tracker.scores()
    inputs = tiny_inputs()
    expect = None
    for _ in range(2):
        model.zero_grad()
        model(**inputs, labels=torch.tensor([0, 1])).loss.backward()
        tracker.update()
        sums = gradient_unit_sums(model)
        expect = sums.ffn[0] if expect is None else expect + sums.ffn[0]
    torch.testing.assert_close(tracker.scores().ffn[0], -expect)
    assert tracker.steps == 2
