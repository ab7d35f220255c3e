"""Sparse attention on a CUDA GPU (skipped without one): every kernel against the reference, values and gradients,
and inside models (every family, training, generate with the bounded cache).

The blocked kernel's fast band path calls torch's CPU-only flash op; on a GPU the kernel must take its masked-SDPA
path instead. These tests are the only ones that see that choice, so they run wherever a GPU is lent.
"""

from __future__ import annotations

import json

import pytest
import torch

from sparse_nlp.attention import apply_attention
from sparse_nlp.attention import kernels as kernels_module
from sparse_nlp.attention.cache import SinkWindowCache
from sparse_nlp.attention.kernels.flex import flex_attention_kernel
from sparse_nlp.attention.kernels.reference import reference_attention
from sparse_nlp.attention.patterns import BigBird, GlobalTokens, SlidingWindow
from sparse_nlp.config import AttentionSparsity

from .conftest import DECODERS, FAMILIES, GENERATE_CACHE, tiny_inputs, tiny_model
from .test_attention import BAND_PATTERNS, _inputs, _spec, check_blocked_against_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _full_fp32_matmuls():
    """float32 matrix products in full precision (no TF32), whatever the process set before."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _close(out, ref, tol=1e-5):
    return (out - ref).abs().max().item() <= tol + 2e-6 * ref.abs().max().item()


@pytest.mark.parametrize("block", [16, 0])  # 0: the default forward and backward blocks
@pytest.mark.parametrize("pad", ["none", "right", "left"])
@pytest.mark.parametrize("pattern", BAND_PATTERNS, ids=lambda p: p.key())
def test_blocked_equals_reference_on_cuda(pattern, pad, block):
    q, k, v, real = _inputs(pad, n=150, dim=16, device=CUDA)  # not a multiple of any block
    out = check_blocked_against_reference(q, k, v, _spec(pattern, real, pad, block=block), close=_close)
    assert out.device.type == "cuda"


@pytest.mark.parametrize(
    "pattern",
    [SlidingWindow(64) | GlobalTokens((0,)), BigBird(block_size=16, random_blocks=1, random_span=64)],
)
def test_flex_compiled_equals_reference_on_cuda(pattern):
    for pad, n in (("right", 300), ("none", 256)):
        q, k, v, real = _inputs(pad, n=n, batch=2, dim=32, device=CUDA)
        spec = _spec(pattern, real, pad)
        with torch.no_grad():
            ref = reference_attention(q, k, v, spec, 0.2)
            out = flex_attention_kernel(q, k, v, spec, 0.2)
        assert _close(out, ref)


def test_auto_kernel_runs_long_inputs_on_cuda_with_gradients(chosen):
    q, k, v, real = _inputs("right", n=600, batch=2, dim=32, device=CUDA)
    spec = _spec(SlidingWindow(128) | GlobalTokens((0,)), real, "right", block=0)
    out = kernels_module.run_kernel(q, k, v, spec, 0.2)
    assert chosen == ["blocked"]
    ref = reference_attention(q, k, v, spec, 0.2)
    assert _close(out, ref)
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_blocked_equals_reference_on_cuda(family, chosen):
    x = {name: t.to(CUDA) for name, t in tiny_inputs(batch=2, length=40).items()}
    outs = []
    for kernel in ("reference", "blocked"):
        # the tiny mistral's own sliding window would send every call to the reference kernel
        model = (
            tiny_model(family, **({"sliding_window": None} if family == "mistral" else {})).to(CUDA).eval()
        )
        causal = family in DECODERS
        apply_attention(
            model, AttentionSparsity("sliding_window", {"window": 8, "causal": causal}, kernel=kernel)
        )
        with torch.no_grad():
            outs.append(model(**x).logits)
    assert outs[0].device.type == "cuda"
    assert _close(outs[1], outs[0])
    assert set(chosen) == {"reference", "blocked"}  # the blocked kernel did run


def test_training_gradients_blocked_equal_reference_on_cuda(chosen):
    grads = []
    x = {name: t.to(CUDA) for name, t in tiny_inputs(batch=2, length=45).items()}
    for kernel in ("reference", "blocked"):
        model = tiny_model("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).to(CUDA).train()
        apply_attention(model, AttentionSparsity("union", {"patterns": [
            {"pattern": "sliding_window", "options": {"window": 8}},
            {"pattern": "global_tokens", "options": {"positions": [0]}},
        ]}, kernel=kernel, block_size=8))  # fmt: skip
        model(**x, labels=torch.tensor([0, 1], device=CUDA)).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert _close(grads[1][name], grads[0][name]), name
    assert set(chosen) == {"reference", "blocked"}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_with_the_bounded_cache_on_cuda(family, chosen):
    model = tiny_model(family).to(CUDA).eval()
    # blocked: the prompt's pass runs the blocked kernel (auto would take the reference below 256 tokens)
    apply_attention(model, AttentionSparsity("sink_window", {"window": 5, "sinks": 2}, kernel="blocked"))
    x = {name: t.to(CUDA) for name, t in tiny_inputs(batch=2, length=8, pad=False).items()}
    x["attention_mask"][1, :3] = 0  # left padding, as generate wants it
    kw = dict(
        max_new_tokens=12, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True
    )
    full = model.generate(**x, use_cache=False, **kw)
    cache = SinkWindowCache(model, x["attention_mask"])
    bounded = model.generate(**x, **{GENERATE_CACHE: cache}, **kw)
    assert torch.equal(bounded.sequences, full.sequences)
    for a, b in zip(bounded.logits, full.logits, strict=True):
        assert (a - b).abs().max() < 1e-4
    assert cache.layers[0].keys.device.type == "cuda"
    assert cache.layers[0].keys.shape[-2] == 2 + 3 + 5 - 1  # sinks + left padding + window - 1
    assert "blocked" in chosen


def test_sink_window_blocked_kernel_on_cuda_matches_cpu(chosen):
    """The same model and input on the CPU (flash-op path or native kernel) and the GPU (masked SDPA path)."""
    x = tiny_inputs(batch=2, length=300)
    outs = []
    for device in ("cpu", "cuda"):
        model = tiny_model("llama").to(device).eval()
        apply_attention(model, AttentionSparsity("sink_window", {"window": 64, "sinks": 4}, kernel="blocked"))
        with torch.no_grad():
            outs.append(model(**{n: t.to(device) for n, t in x.items()}).logits.cpu())
    assert _close(outs[1], outs[0], tol=1e-4)
    assert set(chosen) == {"blocked"}


def test_gpu_speed_benchmark_runs_and_checks_its_kernels(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "speed.json"
    args = [
        "--lengths",
        "512",
        "1024",
        "--train-length",
        "512",
        "--window",
        "64",
        "--repeats",
        "3",
        "--out",
        str(out),
    ]
    done = subprocess.run(
        [sys.executable, "benchmarks/attention_speed_gpu.py", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["N"] for r in rows] == [512, 1024]
    assert all(r["blocked_max_error"] < 1e-5 and r["flex_max_error"] < 1e-5 for r in rows)
    assert "train_blocked_speedup" in rows[0]
