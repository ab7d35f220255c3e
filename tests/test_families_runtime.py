"""The sparse runtime (`sparse_nlp.runtime.convert`) on every family of the targets table: logits of the packed model
equal those of the masked dense model."""

from __future__ import annotations

import pytest
import torch

import sparse_nlp
from sparse_nlp import runtime
from sparse_nlp.config import SparsityConfig
from sparse_nlp.pruning.experts import masked_experts
from sparse_nlp.pruning.masking import masked_modules
from sparse_nlp.runtime import kernels
from sparse_nlp.targets import TARGETS

from .conftest import DECODERS, tiny_inputs, tiny_model
from .test_families import INFERRED, MOE, NEW_DECODERS, NEW_FAMILIES, family_model, moe_model


def any_family_model(family: str):
    if family in MOE:
        return moe_model(family)
    if family in NEW_FAMILIES:
        return family_model(family)
    return tiny_model(family)


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_converted_logits_equal_the_masked_model(family):
    if kernels.ops() is None:
        pytest.skip(f"native kernel unavailable: {kernels.status()}")
    model = any_family_model(family)
    sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.6), progress=False)
    pruned = len(list(masked_modules(model)))
    experts = {name: mask.clone() for name, _, _, mask in masked_experts(model)}
    inputs = tiny_inputs()
    with torch.no_grad():
        expected = model(**inputs).logits
    runtime.convert(model, methods=("native",))
    assert len(runtime.converted_layers(model)) == pruned > 0
    with torch.no_grad():
        got = model(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    after = {name: mask for name, _, _, mask in masked_experts(model)}  # fused experts stay dense, masked
    assert after.keys() == experts.keys() and all(torch.equal(after[k], experts[k]) for k in after)
    if family in DECODERS or family in NEW_DECODERS or family in MOE:
        prompt = tiny_inputs(batch=1, length=6)
        kwargs = dict(max_new_tokens=6, do_sample=False, use_cache=True)
        tokens = model.generate(**prompt, **kwargs)
        runtime.revert(model)
        assert torch.equal(model.generate(**prompt, **kwargs), tokens)


@pytest.mark.parametrize("model_type", sorted(INFERRED))
def test_converted_logits_equal_the_masked_model_on_inferred_layouts(model_type):
    if kernels.ops() is None:
        pytest.skip(f"native kernel unavailable: {kernels.status()}")
    model = INFERRED[model_type][0]()
    sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.6), progress=False)
    pruned = len(list(masked_modules(model)))
    inputs = tiny_inputs()

    def outputs():
        with torch.no_grad():
            out = model(**inputs)
        return out.last_hidden_state if model_type == "t5" else out.logits

    expected = outputs()
    runtime.convert(model, methods=("native",))
    assert len(runtime.converted_layers(model)) == pruned > 0
    torch.testing.assert_close(outputs(), expected, rtol=0, atol=1e-5)
