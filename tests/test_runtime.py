"""sparse_nlp.runtime: packed formats, the native sparse-linear kernel on every ISA path, convert() on every family."""

from __future__ import annotations

import logging
import os
import stat

import pytest
import torch
from torch import nn

from sparse_nlp import runtime
from sparse_nlp.native import NativeBuildError, build
from sparse_nlp.pruning.masking import attach_mask, get_mask
from sparse_nlp.runtime import CSRWeight, SparseLinear, SparseRuntimeError, autotune, kernels
from tests.conftest import GENERATE_CACHE, tiny_inputs, tiny_model


def _ops():
    op = kernels.ops()
    if op is None:
        pytest.skip(f"native kernel unavailable: {kernels.status()}")
    return op


def _isas() -> list[int]:
    op = kernels.ops()
    return [0] if op is None else list(range(int(op.cpu_isa()) + 1))


def _weight(out_f: int, in_f: int, sparsity: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A masked weight with one empty row and one fully dense row (when out_f >= 3)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=g)
    mask = torch.rand(out_f, in_f, generator=g) >= sparsity
    if out_f >= 3:
        mask[1] = False
        mask[2] = True
    return weight * mask, mask


# ---- format ---------------------------------------------------------------------------------------------------


def test_csr_round_trip_keeps_mask_and_values():
    weight, mask = _weight(7, 19, 0.6)
    weight[tuple(mask.nonzero()[0].tolist())] = 0.0  # a kept exact zero stays an entry
    csr = CSRWeight.from_dense(weight, mask)
    assert csr.cols.dtype == torch.uint16 and csr.rowptr.dtype == torch.int32
    assert csr.nnz == int(mask.sum())
    assert torch.equal(csr.to_dense(), weight)
    assert torch.equal(csr.mask_dense(), mask)
    wide = CSRWeight.from_dense(torch.zeros(2, 70_000).index_fill_(1, torch.tensor([3, 69_999]), 1.0))
    assert wide.cols.dtype == torch.int32 and wide.cols.tolist() == [3, 69_999, 3, 69_999]


def _block_weight(out_f, in_f, block, sparsity, seed=0):
    """A weight masked by whole aligned `block` (R, C) blocks, with an empty and a full block row."""
    rows, cols = block
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(out_f // rows, in_f // cols, generator=g) >= sparsity
    if out_f // rows >= 3:
        blocks[1] = False
        blocks[2] = True
    mask = blocks.repeat_interleave(rows, 0).repeat_interleave(cols, 1)
    return torch.randn(out_f, in_f, generator=g) * mask, mask


@pytest.mark.parametrize("block", [(2, 1), (4, 4), (8, 2), (4, 1)])
def test_block_masks_pack_as_blocks_and_round_trip(block):
    weight, mask = _block_weight(24, 40, block, 0.7)
    assert runtime.formats.block_shape(mask) == block
    packed = runtime.pack_weight(weight, mask)
    assert isinstance(packed, runtime.BSRWeight) and packed.block == block
    assert torch.equal(packed.to_dense(), weight) and torch.equal(packed.mask_dense(), mask)
    assert packed.nnz == int(mask.sum())
    # the torch CSR view of a block weight is the same weight
    assert torch.equal(packed.to_torch_csr().to_dense(), weight)


def test_non_block_masks_pack_as_rows():
    weight, mask = _weight(24, 40, 0.7)
    assert runtime.formats.block_shape(mask) is None
    assert isinstance(runtime.pack_weight(weight, mask), CSRWeight)
    odd = torch.ones(6, 10, dtype=torch.bool)  # 6 rows: no 4- or 8-row blocks; 2 x 2 blocks tile it
    assert runtime.formats.block_shape(odd) == (2, 2)
    assert runtime.formats.block_shape(torch.zeros(8, 8, dtype=torch.bool)) is None
    with pytest.raises(ValueError, match="does not tile"):
        runtime.BSRWeight.from_dense(torch.ones(6, 8), None, (4, 4))


# ---- kernels ---------------------------------------------------------------------------------------------------

SHAPES = [(1, 1), (5, 3), (37, 53), (3, 200), (130, 29), (64, 96)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_dense_on_every_isa(shape, sparsity, threads):
    op = _ops()
    out_f, in_f = shape
    torch.manual_seed(out_f * 1000 + in_f)
    weight, mask = _weight(out_f, in_f, sparsity, seed=out_f * 1000 + in_f)
    csr = CSRWeight.from_dense(weight, mask)
    bias = torch.randn(out_f)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for tokens in (1, 2, 7, 9, 64, 150):
            x = torch.randn(tokens, in_f)
            ref = (x.double() @ weight.double().t() + bias.double()).float()
            for isa in _isas():
                y = op.sparse_linear(x, csr.rowptr, csr.cols, csr.vals, bias, in_f, isa)
                scale = max(1.0, float(ref.abs().max()))
                torch.testing.assert_close(
                    y, ref, rtol=0, atol=1e-5 * scale, msg=f"isa {isa}, tokens {tokens}"
                )
                y0 = op.sparse_linear(x, csr.rowptr, csr.cols, csr.vals, None, in_f, isa)
                torch.testing.assert_close(y0, ref - bias, rtol=0, atol=1e-5 * scale)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("vectors", ["1", "2", "3", "4"])
def test_kernel_every_panel_width(monkeypatch, vectors):
    """Token panels of 1-4 vectors (SPARSE_NLP_RUNTIME_NV), with a narrower last panel and row/column counts that
    leave edges around the 8 x 8 transposes."""
    op = _ops()
    monkeypatch.setenv("SPARSE_NLP_RUNTIME_NV", vectors)
    for out_f, in_f in ((130, 29), (64, 96), (9, 17)):
        weight, mask = _weight(out_f, in_f, 0.7, seed=out_f + in_f)
        csr = CSRWeight.from_dense(weight, mask)
        bias = torch.randn(out_f)
        for tokens in (2, 31, 33, 100):
            x = torch.randn(tokens, in_f)
            ref = (x.double() @ weight.double().t() + bias.double()).float()
            for isa in _isas():
                y = op.sparse_linear(x, csr.rowptr, csr.cols, csr.vals, bias, in_f, isa)
                torch.testing.assert_close(
                    y,
                    ref,
                    rtol=0,
                    atol=1e-5 * max(1.0, float(ref.abs().max())),
                    msg=f"isa {isa}, tokens {tokens}",
                )


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("block", [(2, 1), (2, 4), (4, 1), (4, 4), (8, 1), (8, 8)])
def test_block_kernel_matches_dense_on_every_isa(block, threads):
    _ops()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for (out_f, in_f), sparsity in (((16, 24), 0.5), ((40, 64), 0.9), ((8, 8), 0.0), ((24, 16), 0.99)):
            weight, mask = _block_weight(out_f, in_f, block, sparsity, seed=out_f + in_f)
            packed = runtime.BSRWeight.from_dense(weight, mask, block)
            bias = torch.randn(out_f)
            for tokens in (1, 2, 5, 33, 150):  # 1-2 tokens: the decoding path
                x = torch.randn(tokens, in_f)
                ref = (x.double() @ weight.double().t() + bias.double()).float()
                for isa in _isas():
                    y = packed.run(x, bias, isa)
                    torch.testing.assert_close(
                        y,
                        ref,
                        rtol=0,
                        atol=1e-5 * max(1.0, float(ref.abs().max())),
                        msg=f"isa {isa}, {tokens}",
                    )
                    torch.testing.assert_close(
                        packed.run(x, None, isa),
                        ref - bias,
                        rtol=0,
                        atol=1e-5 * max(1.0, float(ref.abs().max())),
                    )
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("sparsity", "pattern", "kinds"),
    [(0.75, "block:4x4", {"bsr4x4", "bsr8x4", "bsr4x8", "bsr8x8"}), (0.5, "2:4", {"nm2:4"})],
)
def test_structured_pruned_model_converts_to_its_format(tmp_path, monkeypatch, sparsity, pattern, kinds):
    """Block and N:M masks pack in their own formats, give the masked model's logits, and keep the format when the
    dense view is loaded back."""
    import sparse_nlp
    from sparse_nlp.config import SparsityConfig

    _ops()
    monkeypatch.setenv("SPARSE_NLP_CACHE", str(tmp_path))
    model = tiny_model("llama")
    sparse_nlp.sparsify(
        model, SparsityConfig.magnitude(sparsity, pattern=pattern, targets="all-linear"), progress=False
    )
    inputs = tiny_inputs()
    with torch.no_grad():
        ref = model(**inputs).logits
    runtime.convert(model, methods=("native",))
    layers = runtime.converted_layers(model)
    assert layers and {layer.csr.kind for layer in layers.values()} <= kinds
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, ref, rtol=0, atol=1e-5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)  # reloading the dense view keeps the format
    assert {layer.csr.kind for layer in runtime.converted_layers(model).values()} <= kinds
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, ref, rtol=0, atol=1e-5)


def _nm_weight(out_f: int, in_f: int, n: int, m: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight masked to exactly n of every m consecutive inputs per row, with one kept exact zero."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(out_f, in_f // m, m, generator=g).argsort(dim=2)[..., :n]
    mask = torch.zeros(out_f, in_f // m, m, dtype=torch.bool).scatter_(2, keep, True).reshape(out_f, in_f)
    weight = torch.randn(out_f, in_f, generator=g) * mask
    weight[tuple(mask.nonzero()[0].tolist())] = 0.0
    return weight, mask


NM_PATTERNS = [(1, 4), (2, 4), (1, 8), (2, 8), (3, 8), (4, 8)]


@pytest.mark.parametrize("pattern", NM_PATTERNS)
def test_nm_masks_pack_as_nm_and_round_trip(pattern):
    n, m = pattern
    for out_f, in_f in ((13, 16), (8, 8), (1, 24), (40, 64)):
        weight, mask = _nm_weight(out_f, in_f, n, m, seed=out_f)
        packed = runtime.pack_weight(weight, mask)
        assert isinstance(packed, runtime.NMWeight)
        assert packed.pattern == runtime.formats.nm_pattern(mask)  # groups of 4 first: a 2:4 mask is also 4:8
        if m == 4:
            assert packed.pattern == pattern
        packed = runtime.NMWeight.from_dense(weight, mask, pattern)
        assert packed.kind == f"nm{n}:{m}" and packed.nnz == int(mask.sum())
        assert packed.idx.shape == (-(-out_f // 8), in_f // m, n) and packed.idx.dtype == torch.int32
        assert torch.equal(packed.to_dense(), weight)
        assert torch.equal(packed.mask_dense(), mask)  # the kept exact zero included
        assert torch.equal(packed.clone().to_dense(), weight)
        assert packed.to_torch_csr().to_dense().equal(weight)
    weight, mask = _nm_weight(384, 384, n, m)
    assert runtime.pack_weight(weight, mask).nbytes() < CSRWeight.from_dense(weight, mask).nbytes()


def test_masks_that_are_not_nm_pack_as_rows():
    weight, mask = _nm_weight(16, 32, 2, 4)
    assert runtime.formats.nm_pattern(mask) == (2, 4)
    uneven = mask.clone()
    uneven[3, :4] = torch.tensor([True, False, False, False])  # one group keeps 1 of 4
    assert runtime.formats.nm_pattern(uneven) is None
    assert isinstance(runtime.pack_weight(weight * uneven, uneven), CSRWeight)
    dense_side = torch.ones(16, 32, dtype=torch.bool)
    dense_side[:, ::4] = False  # 3:4 keeps more than half: not worth a sparse kernel
    assert runtime.formats.nm_pattern(dense_side) is None
    assert runtime.formats.nm_pattern(_nm_weight(16, 30, 1, 2)[1]) is None  # 30 inputs: no group of 4 or 8
    with pytest.raises(ValueError, match="not 2:4"):
        runtime.NMWeight.from_dense(weight * uneven, uneven, (2, 4))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("pattern", NM_PATTERNS)
def test_nm_kernel_matches_dense_on_every_isa(pattern, threads):
    _ops()
    n, m = pattern
    gelu = kernels.ACTIVATIONS["gelu"]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for out_f, in_f in ((13, 16), (1, 8), (130, 96), (64, 512)):
            weight, mask = _nm_weight(out_f, in_f, n, m, seed=out_f + in_f)
            packed = runtime.NMWeight.from_dense(weight, mask, pattern)
            bias = torch.randn(out_f)
            for tokens in (1, 2, 5, 8, 9, 33, 150):  # every count of tokens per pass, and their remainders
                x = torch.randn(tokens, in_f)
                ref = (x.double() @ weight.double().t() + bias.double()).float()
                scale = max(1.0, float(ref.abs().max()))
                for isa in _isas():
                    torch.testing.assert_close(
                        packed.run(x, bias, isa), ref, rtol=0, atol=1e-5 * scale, msg=f"isa {isa}, {tokens}"
                    )
                    torch.testing.assert_close(
                        packed.run(x, None, isa), ref - bias, rtol=0, atol=1e-5 * scale
                    )
                    torch.testing.assert_close(
                        packed.run(x, bias, isa, gelu),
                        torch.nn.functional.gelu(ref.double()).float(),
                        rtol=0,
                        atol=1e-5 * scale,
                        msg=f"gelu, isa {isa}, {tokens}",
                    )
            x = torch.randn(2, 3, in_f)  # any leading shape
            assert packed.run(x, bias, 0).shape == (2, 3, out_f)
    finally:
        torch.set_num_threads(before)


def test_nm_kernel_refuses_bad_input():
    op = _ops()
    weight, mask = _nm_weight(16, 32, 2, 4)
    packed = runtime.NMWeight.from_dense(weight, mask, (2, 4))
    x = torch.randn(3, 32)
    with pytest.raises(RuntimeError, match="unsupported pattern 3:4"):
        op.nm_linear(x, packed.idx, packed.vals, None, 32, 16, 3, 4, 0)
    with pytest.raises(RuntimeError, match="do not match"):
        op.nm_linear(x, packed.idx, packed.vals[:1], None, 32, 16, 2, 4, 0)
    with pytest.raises(RuntimeError, match="features"):
        op.nm_linear(torch.randn(3, 31), packed.idx, packed.vals, None, 32, 16, 2, 4, 0)


def test_kernel_wide_input_uses_int32_indices():
    op = _ops()
    torch.manual_seed(0)
    weight, mask = _weight(2, 70_000, 0.995, seed=3)  # no forced dense row: 70,000-term sums drift past 1e-5
    csr = CSRWeight.from_dense(weight, mask)
    assert csr.cols.dtype == torch.int32
    for tokens in (1, 5, 20):
        x = torch.randn(tokens, 70_000)
        ref = (x.double() @ weight.double().t()).float()
        for isa in _isas():
            y = op.sparse_linear(x, csr.rowptr, csr.cols, csr.vals, None, 70_000, isa)
            torch.testing.assert_close(y, ref, rtol=0, atol=1e-5 * max(1.0, float(ref.abs().max())))


def test_forced_portable_path(monkeypatch):
    op = _ops()
    monkeypatch.setenv(kernels.ENV_ISA, "portable")
    assert kernels.best_isa() == 0
    monkeypatch.setenv(kernels.ENV_ISA, "avx2")
    assert kernels.best_isa() == min(1, int(op.cpu_isa()))
    monkeypatch.setenv(kernels.ENV_ISA, "sse9")
    with pytest.raises(ValueError, match="SPARSE_NLP_RUNTIME_ISA"):
        kernels.best_isa()


def test_layer_uses_forced_portable_path(monkeypatch):
    _ops()
    layer = nn.Linear(45, 21)
    attach_mask(layer, torch.rand(21, 45) > 0.8)
    packed = runtime.pack(layer, {1: "native", 16: "native"}, get_mask(layer))
    x = torch.randn(3, 11, 45)
    monkeypatch.setenv(kernels.ENV_ISA, "portable")
    with torch.no_grad():
        torch.testing.assert_close(packed(x), layer(x), rtol=0, atol=1e-5)


# ---- the layer -------------------------------------------------------------------------------------------------


def _masked_linear(in_f=40, out_f=24, sparsity=0.8, bias=True) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(in_f, out_f, bias=bias)
    attach_mask(layer, torch.rand(out_f, in_f) >= sparsity)
    return layer


@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("method", runtime.METHODS)
def test_every_method_matches_the_masked_layer(method, activation):
    if method == "native":
        _ops()
    layer = _masked_linear()
    packed = runtime.pack(layer, dict.fromkeys(runtime.BUCKETS, method), get_mask(layer))
    packed.activation = activation  # a GELU fused into the layer (fuse_activations sets it)
    then = torch.nn.functional.gelu if activation else (lambda y: y)
    for shape in ((1, 40), (2, 5, 40), (600, 40)):
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(packed(x), then(layer(x)), rtol=0, atol=1e-5)
    assert torch.equal(packed.weight, layer.weight.detach())
    assert set(packed.state_dict()) == {"weight", "bias"}


def test_backward_raises_a_clear_error():
    layer = _masked_linear()
    packed = runtime.pack(layer, dict.fromkeys(runtime.BUCKETS, "dense"), get_mask(layer))
    x = torch.randn(3, 40, requires_grad=True)
    with pytest.raises(SparseRuntimeError, match=r"runtime\.convert"):
        packed(x).sum().backward()


def test_unsupported_dtype_raises_a_clear_error():
    layer = _masked_linear()
    packed = runtime.pack(layer, dict.fromkeys(runtime.BUCKETS, "dense"), get_mask(layer))
    with pytest.raises(SparseRuntimeError, match="fp32"):
        packed(torch.randn(3, 40, dtype=torch.bfloat16))
    with pytest.raises(SparseRuntimeError, match=r"bfloat16"):
        runtime.convert(nn.Sequential(_masked_linear().to(torch.bfloat16)))


def test_bucket_of():
    assert [runtime.bucket_of(t) for t in (1, 3, 5, 16, 45, 46, 128, 255, 257, 10_000)] == [
        1,
        1,
        16,
        16,
        16,
        128,
        128,
        128,
        512,
        512,
    ]


def test_not_sparse_enough_stays_dense():
    model = nn.Sequential(_masked_linear(sparsity=0.2), _masked_linear(in_f=24, out_f=24, sparsity=0.9))
    runtime.convert(model, methods=("dense", "torch_csr"), use_cache=False)
    assert type(model[0]) is nn.Linear


def test_autotune_decisions_of_a_busy_machine_stay_in_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(autotune, "cache_path", lambda: tmp_path / "tune.json")
    monkeypatch.setattr(autotune.os, "getloadavg", lambda: (float((os.cpu_count() or 1) + 3), 0.0, 0.0))
    autotune.clear_memory_cache()
    csr = CSRWeight.from_dense(*_weight(64, 96, 0.9))
    plan = autotune.choose(csr, None, (16,), ("dense", "torch_csr"))
    assert autotune.machine_busy() and not (tmp_path / "tune.json").exists()
    assert autotune.choose(csr, None, (16,), ("dense", "torch_csr")) == plan  # this process keeps it
    monkeypatch.setattr(autotune.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    autotune.clear_memory_cache()
    autotune.choose(csr, None, (16,), ("dense", "torch_csr"))
    assert not autotune.machine_busy() and (tmp_path / "tune.json").exists()
    autotune.clear_memory_cache()


def test_autotune_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(autotune, "cache_path", lambda: tmp_path / "tune.json")
    monkeypatch.setattr(autotune, "machine_busy", lambda: False)
    autotune.clear_memory_cache()
    weight, mask = _weight(64, 96, 0.9)
    csr = CSRWeight.from_dense(weight, mask)
    plan = autotune.choose(csr, None, (1, 16), ("dense", "torch_csr"))
    assert set(plan) == {1, 16} and set(plan.values()) <= {"dense", "torch_csr"}
    assert (tmp_path / "tune.json").exists()
    autotune.clear_memory_cache()

    def no_timing(*args, **kwargs):
        raise AssertionError("timed again although the decision is cached")

    monkeypatch.setattr(autotune, "time_methods", no_timing)
    assert autotune.choose(csr, None, (1, 16), ("dense", "torch_csr")) == plan


# ---- whole models ----------------------------------------------------------------------------------------------


def _prune_all_linear(model: nn.Module, sparsity: float = 0.8, seed: int = 0) -> int:
    from transformers.pytorch_utils import Conv1D

    g = torch.Generator().manual_seed(seed)
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and "lm_head" not in name:
            attach_mask(module, torch.rand(module.weight.shape, generator=g) >= sparsity)
            count += 1
    return count


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_family_converts_with_same_logits_and_generate(family):
    _ops()
    model = tiny_model(family)
    pruned = _prune_all_linear(model)
    inputs = tiny_inputs()
    with torch.no_grad():
        ref = model(**inputs).logits
    runtime.convert(model, methods=("native",))
    assert len(runtime.converted_layers(model)) == pruned
    with torch.no_grad():
        out = model(**inputs).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    if family in ("gpt2", "llama"):
        from transformers import DynamicCache

        ids = inputs["input_ids"][:1]
        dense = tiny_model(family)
        _prune_all_linear(dense)
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        expected = dense.generate(ids, **kwargs, **{GENERATE_CACHE: DynamicCache(config=dense.config)})
        got = model.generate(ids, **kwargs, **{GENERATE_CACHE: DynamicCache(config=model.config)})
        assert torch.equal(got, expected)


def test_autotuned_conversion_matches(tmp_path, monkeypatch):
    monkeypatch.setattr(autotune, "cache_path", lambda: tmp_path / "tune.json")
    model = tiny_model("bert")
    _prune_all_linear(model, sparsity=0.9)
    inputs = tiny_inputs()
    with torch.no_grad():
        ref = model(**inputs).logits
    runtime.convert(model, tokens=(1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, ref, rtol=0, atol=1e-5)


def test_save_load_round_trip_of_a_converted_model(tmp_path, monkeypatch):
    import functools

    import sparse_nlp
    from sparse_nlp import checkpoint
    from sparse_nlp.config import SparsityConfig

    # On layers this small the autotune may keep every layer dense; the load path must pack them all.
    monkeypatch.setattr(checkpoint, "convert", functools.partial(runtime.convert, methods=("native",)))

    _ops()
    model = tiny_model("llama")
    sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.8, targets="all-linear"), progress=False)
    runtime.convert(model, methods=("native",))
    assert runtime.converted_layers(model)
    inputs = tiny_inputs()
    with torch.no_grad():
        ref = model(**inputs).logits
    sparse_nlp.save_pretrained(model, tmp_path / "m")
    loaded = sparse_nlp.from_pretrained(tmp_path / "m")
    assert not runtime.converted_layers(loaded)
    layers = runtime.converted_layers(model)
    for name, layer in layers.items():
        dense = loaded.get_submodule(name)
        assert torch.equal(get_mask(dense), get_mask(layer)), name
        assert torch.equal(dense.weight, layer.weight), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, ref, rtol=0, atol=1e-5)
    fast = sparse_nlp.from_pretrained(tmp_path / "m", runtime="sparse")
    assert runtime.converted_layers(fast)
    with torch.no_grad():
        torch.testing.assert_close(fast(**inputs).logits, ref, rtol=0, atol=1e-5)
    runtime.revert(model)
    assert not runtime.converted_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, ref, rtol=0, atol=1e-5)


def test_no_compiler_warns_once_and_runs_dense(monkeypatch, caplog):
    def fail():
        raise NativeBuildError("no C++ compiler: 'c++' is not on PATH (install g++ or set CXX)")

    monkeypatch.setattr(kernels, "_build", fail)
    kernels._reset()
    try:
        model = tiny_model("bert")
        _prune_all_linear(model, sparsity=0.9)
        inputs = tiny_inputs()
        with torch.no_grad():
            ref = model(**inputs).logits
        with caplog.at_level(logging.WARNING, logger="sparse_nlp"):
            runtime.convert(model, methods=("native",))
            with torch.no_grad():
                out = model(**inputs).logits
            runtime.convert(tiny_model("bert"), methods=("native",))
        warnings = [r for r in caplog.records if "sparse-linear kernel is unavailable" in r.getMessage()]
        assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()
        layer = next(iter(runtime.converted_layers(model).values()))
        assert layer.method_for(1) == "dense" and layer.method_for(512) == "dense"
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    finally:
        kernels._reset()


def test_packed_layer_bytes_are_small():
    layer = _masked_linear(in_f=384, out_f=384, sparsity=0.9)
    packed = runtime.pack(layer, {1: "native"}, get_mask(layer), keep_mask=False)
    assert packed.csr.nbytes() <= 0.2 * layer.weight.numel() * 4
    assert isinstance(packed, SparseLinear) and get_mask(packed) is None


# ---- the build cache -------------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX owners and modes")
def test_build_cache_is_private_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv(build.ENV_CACHE, str(tmp_path / "cache"))
    root = build.cache_root()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(NativeBuildError, match="writable by other users"):
        build.check_owned(shared)
    lib = root / "x.so"
    lib.write_bytes(b"")
    lib.chmod(0o666)
    with pytest.raises(NativeBuildError, match="writable by other users"):
        build.check_owned(lib)


def test_bench_command_with_sparse_runtime(tmp_path, capsys, monkeypatch):
    import json

    import sparse_nlp
    from sparse_nlp.cli import main
    from sparse_nlp.config import SparsityConfig

    monkeypatch.setattr(autotune, "cache_path", lambda: tmp_path / "tune.json")
    monkeypatch.setattr(autotune, "machine_busy", lambda: False)  # the cache is written whatever the load
    model = tiny_model("bert")
    sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.9), progress=False)
    sparse_nlp.save_pretrained(model, tmp_path / "m90")
    sparse_nlp.save_pretrained(tiny_model("bert"), tmp_path / "dense")
    out = tmp_path / "bench.json"
    argv = ["bench", str(tmp_path / "m90"), "--vs", str(tmp_path / "dense"), "--batch", "1,2", "--seq", "8"]
    argv += ["--warmup", "1", "--repeats", "2", "--threads", "1", "--runtime", "sparse", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "runtime sparse:" in printed and "Linear layers" in printed
    data = json.loads(out.read_text())
    assert data["runtime"] == "sparse" and len(data["speedup"]) == 2
    assert json.loads((tmp_path / "tune.json").read_text())  # the layers were timed at bench's token counts


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX owners and modes")
def test_band_attention_build_refuses_a_folder_others_can_write(tmp_path, monkeypatch):
    from sparse_nlp.attention.kernels import native as band

    monkeypatch.setenv(band.ENV_CACHE, str(tmp_path))
    folder = band.cache_dir()
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    with pytest.raises(NativeBuildError, match="writable by other users"):
        band._build()
    folder.chmod(0o755)  # ours and not writable by others: made private, then used
    built = folder / f"sparse_nlp_band_attention_{folder.name.rsplit('-', 1)[1]}.so"
    built.touch()
    built.chmod(0o666)
    with pytest.raises(NativeBuildError, match="writable by other users"):
        band._build()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_converts_a_model_with_structured_removal_and_sparse_attention():
    import sparse_nlp
    from sparse_nlp.config import AttentionSparsity, SparsityConfig
    from sparse_nlp.structured import StructuredSparsity, apply_structured

    _ops()
    model = tiny_model("bert")
    apply_structured(model, StructuredSparsity(heads=0.5, ffn=0.5, score="weight-norm"), progress=False)
    config = SparsityConfig.magnitude(0.8)
    config.attention = AttentionSparsity(pattern="sliding_window", options={"window": 4})
    sparse_nlp.sparsify(model, config, progress=False)
    inputs = tiny_inputs(length=16)
    with torch.no_grad():
        ref = model(**inputs).logits
    runtime.convert(model, methods=("native",))
    layers = runtime.converted_layers(model)
    assert len(layers) == 12  # heads and FFN neurons removed: q/k/v 16 x 32, FFN 32 wide instead of 64
    assert min(min(layer.in_features, layer.out_features) for layer in layers.values()) == 16
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, ref, rtol=0, atol=1e-5)


# ---- a fused activation (GELU applied by the kernel) -------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2])
def test_kernels_apply_gelu_on_every_isa(threads):
    op = _ops()
    gelu = kernels.ACTIVATIONS["gelu"]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for (out_f, in_f), sparsity in (((37, 53), 0.5), ((130, 29), 0.9), ((64, 96), 0.0)):
            weight, mask = _weight(out_f, in_f, sparsity, seed=out_f)
            csr = CSRWeight.from_dense(weight, mask)
            bias = torch.randn(out_f)
            for tokens in (1, 2, 9, 150):
                x = torch.randn(tokens, in_f) * 2
                ref = torch.nn.functional.gelu(x.double() @ weight.double().t() + bias.double()).float()
                for isa in _isas():
                    y = op.sparse_linear(x, csr.rowptr, csr.cols, csr.vals, bias, in_f, isa, gelu)
                    scale = max(1.0, float(ref.abs().max()))
                    torch.testing.assert_close(y, ref, rtol=0, atol=1e-5 * scale, msg=f"isa {isa}, {tokens}")
        for block in ((2, 4), (4, 4), (8, 1)):
            weight, mask = _block_weight(40, 64, block, 0.7, seed=block[0])
            packed = runtime.BSRWeight.from_dense(weight, mask, block)
            bias = torch.randn(40)
            for tokens in (1, 2, 5, 33):
                x = torch.randn(tokens, 64) * 2
                ref = torch.nn.functional.gelu(x.double() @ weight.double().t() + bias.double()).float()
                for isa in _isas():
                    torch.testing.assert_close(
                        packed.run(x, bias, isa, gelu),
                        ref,
                        rtol=0,
                        atol=1e-5 * max(1.0, float(ref.abs().max())),
                        msg=f"block {block}, isa {isa}, {tokens}",
                    )
        with pytest.raises(RuntimeError, match="unknown activation"):
            op.sparse_linear(x[:, :53], csr.rowptr, csr.cols, csr.vals, None, 53, 0, 7)
    finally:
        torch.set_num_threads(before)


def test_kernels_take_inputs_of_any_leading_shape():
    op = _ops()
    weight, mask = _weight(24, 40, 0.8)
    csr = CSRWeight.from_dense(weight, mask)
    x = torch.randn(2, 3, 40)
    y = op.sparse_linear(x, csr.rowptr, csr.cols, csr.vals, None, 40, 0)
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(
        y.reshape(6, 24), op.sparse_linear(x.reshape(6, 40), csr.rowptr, csr.cols, csr.vals, None, 40, 0)
    )
    with pytest.raises(RuntimeError, match="features"):
        op.sparse_linear(torch.randn(2, 39), csr.rowptr, csr.cols, csr.vals, None, 40, 0)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_encoder_gelu_is_fused_into_the_packed_layer_and_reverted(family):
    _ops()
    model = tiny_model(family)
    _prune_all_linear(model)
    inputs = tiny_inputs()
    keys = set(model.state_dict())
    with torch.no_grad():
        ref = model(**inputs).logits
    runtime.convert(model, methods=("native",))
    fused = [m for m in model.modules() if isinstance(m, runtime.FusedActivation)]
    assert len(fused) == model.config.num_hidden_layers > 0
    layers = runtime.converted_layers(model)
    assert {n for n, m in layers.items() if m.activation == "gelu"} == {
        n for n in layers if n.endswith(("intermediate.dense", "ffn.lin1"))
    }
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, ref, rtol=0, atol=1e-5)
    assert set(model.state_dict()) == keys  # the stand-in holds no tensors
    runtime.revert(model)
    assert not any(isinstance(m, runtime.FusedActivation) for m in model.modules())
    pairs = runtime.fusion.PAIRS
    acts = [getattr(m, a) for m in model.modules() for lin, a in pairs if hasattr(m, lin) and hasattr(m, a)]
    assert len(acts) == len(fused)
    assert all(runtime.fusion.activation_kind(act) == "gelu" for act in acts)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, ref, rtol=0, atol=1e-5)


class _Intermediate(nn.Module):
    """An ``*Intermediate``-like module: `dense` then `intermediate_act_fn`, and optionally `dense`'s output again."""

    def __init__(self, act: nn.Module, reuse: bool) -> None:
        super().__init__()
        self.dense = nn.Linear(16, 32)
        self.intermediate_act_fn = act
        self.reuse = reuse

    def forward(self, x):
        h = self.dense(x)
        return self.intermediate_act_fn(h) + (h if self.reuse else 0)


@pytest.mark.parametrize(
    ("act", "reuse", "fused"),
    [
        (nn.GELU(), False, True),
        (nn.GELU(), True, False),
        (nn.GELU(approximate="tanh"), False, False),
        (nn.ReLU(), False, False),
    ],
)
def test_only_an_exact_gelu_that_only_follows_the_layer_is_fused(act, reuse, fused):
    _ops()
    model = nn.Sequential(_Intermediate(act, reuse))
    _prune_all_linear(model)
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        ref = model(x)
    runtime.convert(model, methods=("native",))
    assert isinstance(model[0].intermediate_act_fn, runtime.FusedActivation) is fused
    assert (model[0].dense.activation == "gelu") is fused
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-5)


# ---- the mask of a packed layer --------------------------------------------------------------------------------


@pytest.mark.parametrize("conv1d", [False, True])
def test_packed_layer_records_its_mask_without_storing_it(conv1d):
    """The packed index is the mask: `get_mask` rebuilds it exactly (a kept exact zero included, Conv1D layout
    too) while the layer holds no mask tensor (a bool mask would cost 1 byte per weight)."""
    from transformers.pytorch_utils import Conv1D

    from sparse_nlp.pruning.masking import MASK_BUFFER, masked_modules

    layer = Conv1D(48, 64) if conv1d else nn.Linear(64, 48)  # Conv1D weight (in, out)
    weight, mask = _weight(48, 64, 0.8)
    mask[0, :4] = True
    with torch.no_grad():
        layer.weight.copy_(weight.t() if conv1d else weight)
        layer.weight[0, 0] = 0.0  # kept, but exactly zero
    wmask = mask.t().contiguous() if conv1d else mask
    attach_mask(layer, wmask)
    model = nn.Sequential(layer)
    runtime.convert(model, methods=("native",))
    packed = model[0]
    assert isinstance(packed, SparseLinear) and packed.keeps_mask
    assert MASK_BUFFER not in packed._buffers
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in packed.buffers()}
    assert sum(held.values()) == packed.csr.nbytes()  # rowptr, cols, vals: nothing per weight beyond them
    assert torch.equal(get_mask(packed), wmask)
    assert [n for n, _ in masked_modules(model, derived=True)] == ["0"]
    assert not list(masked_modules(model))  # the buffer-only view is unchanged
    runtime.revert(model)
    assert torch.equal(get_mask(model[0]), wmask)


def test_packed_layer_refuses_a_mask_it_was_not_packed_by():
    weight, mask = _weight(16, 32, 0.7)
    other = mask.clone()
    other[0, 0] = not bool(other[0, 0])
    with pytest.raises(SparseRuntimeError, match="packed by"):
        SparseLinear(runtime.pack_weight(weight, mask), None, {1: "native"}, mask=other)
