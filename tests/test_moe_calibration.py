"""Wanda and SparseGPT on fused mixture-of-experts parameters: each expert calibrated on its routed tokens."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import sparse_nlp
from sparse_nlp.config import SparsityConfig, WeightSparsity
from sparse_nlp.pruning.experts import ExpertPlan, ExpertStats, masked_experts
from sparse_nlp.pruning.masks import num_pruned, per_row_mask, select_mask
from sparse_nlp.pruning.methods import get_method
from sparse_nlp.pruning.patterns import parse_pattern

from .conftest import VOCAB
from .test_families import MOE, expert_masks, id_batches, moe_model

LAYER0_EXPERTS = r"re:layers\.0\.mlp\.experts\."


def _rule(method: str, pattern: str = "unstructured", targets=("all-linear",)) -> SparsityConfig:
    return SparsityConfig(
        weights=[WeightSparsity(method=method, sparsity=0.5, pattern=pattern, targets=list(targets))]
    )


def _routed_inputs(model, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (N, H), router choice (N, k)) reaching layer 0's experts in a dense forward."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    experts = model.model.layers[0].mlp.experts
    handle = experts.register_forward_pre_hook(
        lambda m, args: seen.append((args[0].clone(), args[1].clone()))
    )
    with torch.no_grad():
        for batch in batches:
            model(**batch, use_cache=False)
    handle.remove()
    return torch.cat([h for h, _ in seen]), torch.cat([i for _, i in seen])


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_calibrated_experts_reach_the_target_per_slice(family, method, pattern, caplog):
    model = moe_model(family)
    router = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}
    with caplog.at_level(logging.WARNING):
        sparse_nlp.sparsify(model, _rule(method, pattern), data=id_batches(), progress=False)
    assert "received no calibration token" not in caplog.text  # every expert got routed tokens here
    masks = expert_masks(model)
    assert len(masks) == 4  # gate_up_proj and down_proj of both layers
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.all(params[name][~mask] == 0), name
        for e in range(mask.shape[0]):
            if pattern == "2:4":
                assert torch.all(mask[e].reshape(mask.shape[1], -1, 4).sum(-1) == 2), (name, e)
            else:
                assert int((~mask[e]).sum()) == num_pruned(0.5, mask[e].numel()), (name, e)
    assert all(torch.equal(params[n], w) for n, w in router.items()) and router
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=id_batches(1)[0]["input_ids"]).logits).all()


def test_wanda_scores_each_expert_by_the_norms_of_its_routed_tokens():
    model = moe_model("mixtral")
    dense = copy.deepcopy(model)
    batches = id_batches()
    sparse_nlp.sparsify(model, _rule("wanda", targets=[LAYER0_EXPERTS]), data=batches, progress=False)
    masks = {n.split("experts.")[1]: m for n, m in expert_masks(model).items()}
    assert sorted(masks) == ["down_proj", "gate_up_proj"]

    hidden, chosen = _routed_inputs(dense, batches)  # (N, H), (N, k)
    experts = dense.model.layers[0].mlp.experts
    differs_from_all_tokens = False
    for e in range(experts.gate_up_proj.shape[0]):
        x = hidden[(chosen == e).any(-1)]  # (n_e, H): only the tokens the router sends to expert e
        assert 0 < x.shape[0] < hidden.shape[0]
        gate, up = (x @ experts.gate_up_proj[e].detach().t()).chunk(2, dim=-1)
        inner = experts.act_fn(gate) * up  # (n_e, F) the input of down_proj[e]
        for param, inputs, everyone in (
            ("gate_up_proj", x, hidden),
            ("down_proj", inner, None),
        ):
            weight = getattr(experts, param)[e].detach()  # (out, in)
            expected = per_row_mask(weight.abs() * inputs.pow(2).sum(0).sqrt(), 0.5)
            assert torch.equal(masks[param][e], expected), (param, e)
            if everyone is not None:
                all_tokens = per_row_mask(weight.abs() * everyone.pow(2).sum(0).sqrt(), 0.5)
                differs_from_all_tokens |= not torch.equal(all_tokens, expected)
    assert differs_from_all_tokens  # the check above tells routed norms from all-token norms


def test_expert_stats_count_only_real_routed_tokens():
    model = moe_model("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    plans = [
        ExpertPlan(
            f"e.{p}", experts, p, get_method("sparsegpt"), 0.5, parse_pattern("unstructured"), "per-layer"
        )
        for p in ("gate_up_proj", "down_proj")
    ]
    watch = ExpertStats(plans)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2 * 5, 32, generator=g)  # (B*T, H) with B=2, T=5
    chosen = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 3], [1, 3], [0, 2], [1, 0], [3, 2], [2, 1], [0, 1]])
    token_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)  # right padding
    watch.token_mask = token_mask
    with torch.no_grad():
        experts(hidden, chosen, torch.full(chosen.shape, 0.5))
    watch.remove()
    real = token_mask.reshape(-1)
    for e in range(4):
        routed = (chosen == e).any(-1) & real
        x = hidden[routed]
        st = watch.stats["e.gate_up_proj"][e]
        assert st.count == int(routed.sum())
        torch.testing.assert_close(st.sq_norm, x.pow(2).sum(0))
        torch.testing.assert_close(st.hessian, x.t() @ x)
        gate, up = (x @ experts.gate_up_proj[e].detach().t()).chunk(2, dim=-1)
        inner = experts.act_fn(gate) * up
        torch.testing.assert_close(watch.stats["e.down_proj"][e].hessian, inner.t() @ inner)
    assert watch.stats["e.gate_up_proj"][3].count == 1  # token 3 of row 0 is padding


@pytest.mark.parametrize("family", MOE)
def test_sparsegpt_reconstructs_the_expert_layer_better_than_magnitude(family):
    dense = moe_model(family)
    batches = id_batches()
    moe_block = dense.model.layers[0].mlp
    seen: list[torch.Tensor] = []
    handle = moe_block.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    with torch.no_grad():
        for batch in batches:
            dense(**batch, use_cache=False)
    handle.remove()
    x = torch.cat(seen)  # (B, T, H) the inputs of layer 0's mixture-of-experts block
    with torch.no_grad():
        target = moe_block(x)

    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(dense)
        data = None if method == "magnitude" else batches
        sparse_nlp.sparsify(model, _rule(method, targets=[LAYER0_EXPERTS]), data=data, progress=False)
        with torch.no_grad():
            errors[method] = float((model.model.layers[0].mlp(x) - target).pow(2).sum())
    assert errors["sparsegpt"] < 0.9 * errors["magnitude"], errors  # measured 0.74-0.79 x magnitude's error
    assert errors["wanda"] < errors["magnitude"], errors


def test_an_expert_without_calibration_tokens_falls_back_to_magnitude(caplog):
    model = moe_model("mixtral")
    original = copy.deepcopy(model)
    one_token = [{"input_ids": torch.tensor([[VOCAB - 1]])}]  # top-2 of 4 experts: two get nothing
    with caplog.at_level(logging.WARNING, logger="sparse_nlp.pruning.experts"):
        sparse_nlp.sparsify(model, _rule("wanda", targets=[LAYER0_EXPERTS]), data=one_token, progress=False)
    _, chosen = _routed_inputs(original, [{"input_ids": one_token[0]["input_ids"]}])
    unused = sorted(set(range(4)) - set(chosen.reshape(-1).tolist()))
    assert len(unused) == 2
    experts = original.model.layers[0].mlp.experts
    for name, mask in expert_masks(model).items():
        param = name.rsplit(".", 1)[1]
        for e in range(4):
            assert int((~mask[e]).sum()) == num_pruned(0.5, mask[e].numel())
            magnitude = select_mask(
                getattr(experts, param)[e].detach().abs(), 0.5, parse_pattern("unstructured"), "per-layer"
            )
            assert torch.equal(mask[e], magnitude) == (e in unused), (name, e)
            if e in unused:
                assert f"{name}: expert {e} received no calibration token" in caplog.text


def test_calibrated_experts_save_and_load_exactly(tmp_path):
    model = moe_model("qwen2_moe")
    sparse_nlp.sparsify(model, _rule("sparsegpt"), data=id_batches(), progress=False)
    ids = id_batches(1)[0]["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    sparse_nlp.save_pretrained(model, tmp_path / "ckpt")
    loaded = sparse_nlp.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    before = {n: m for n, _, _, m in masked_experts(model)}
    after = {n: m for n, _, _, m in masked_experts(loaded)}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
