"""Sparse attention on a model that soft-caps its attention logits (Gemma 2's attn_logit_softcapping)."""

from __future__ import annotations

import logging

import torch
import transformers

from sparse_nlp.attention.apply import apply_attention, remove_attention
from sparse_nlp.attention.patterns import build_pattern, dense_mask
from sparse_nlp.config import AttentionSparsity

from .conftest import tiny_inputs
from .test_families import family_config, logits

CAP = 1.0


def capped_model(family: str, cap: float | None = CAP):
    """A tiny model whose attention logits are large enough for soft-capping to change the outputs."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        family_config(family, attn_logit_softcapping=cap)
    ).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(40)
            layer.self_attn.k_proj.weight.mul_(40)
    return model


def window(width: int) -> AttentionSparsity:
    return AttentionSparsity("sliding_window", {"window": width, "causal": True})


def test_softcapped_attention_equals_eager():
    family = "gemma2"
    x = tiny_inputs(batch=2, length=12)  # the last row right-padded
    model = capped_model(family)
    eager = logits(model, x)
    assert (logits(capped_model(family, cap=None), x) - eager).abs().max() > 0.05  # the cap matters here
    apply_attention(model, window(1000))  # wider than the input: dense attention, soft-capped
    torch.testing.assert_close(logits(model, x), eager, rtol=1e-5, atol=1e-5)

    apply_attention(model, window(2))
    ids = x["input_ids"]
    allowed = dense_mask(
        build_pattern("sliding_window", {"window": 2, "causal": True}),
        torch.arange(12),
        torch.arange(12),
        batch=2,
    )  # (B, L, L)
    sparse = logits(model, {"input_ids": ids})
    remove_attention(model)
    additive = torch.zeros(2, 1, 12, 12).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    reference = logits(model, {"input_ids": ids, "attention_mask": additive})  # eager under the same mask
    torch.testing.assert_close(sparse, reference, rtol=1e-5, atol=1e-5)
    assert (
        sparse - logits(model, {"input_ids": ids})
    ).abs().max() > 1e-3  # the pattern reaches the attention


def test_softcapped_generation_with_cache_equals_eager(caplog):
    model = capped_model("gemma2")
    prompt = tiny_inputs(batch=1, length=6)
    kwargs = dict(max_new_tokens=6, do_sample=False, use_cache=True)
    expected = model.generate(**prompt, **kwargs)
    apply_attention(
        model, AttentionSparsity("sliding_window", {"window": 1000, "causal": True}, kernel="blocked")
    )
    with caplog.at_level(logging.WARNING, logger="sparse_nlp.attention.registration"):
        assert torch.equal(model.generate(**prompt, **kwargs), expected)
    assert "soft-caps its attention logits" in caplog.text  # the blocked kernel was asked; reference ran


def test_softcapped_attention_trains_like_eager():
    x = tiny_inputs(batch=2, length=12, pad=False)
    grads = []
    for sparse in (False, True):
        model = capped_model("gemma2")
        model.train()
        if sparse:
            apply_attention(model, window(1000))
        model(**x, labels=x["input_ids"]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if "self_attn" in n})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
