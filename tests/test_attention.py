"""Sparse attention patterns against brute-force definitions; kernels against the reference (values and gradients)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sparse_nlp.attention.kernels import choose_kernel, native, run_kernel
from sparse_nlp.attention.kernels.blocked import blocked_attention
from sparse_nlp.attention.kernels.flex import flex_attention_kernel
from sparse_nlp.attention.kernels.reference import reference_attention
from sparse_nlp.attention.patterns import (
    AttentionPatternError,
    BigBird,
    DilatedWindow,
    Fixed,
    GlobalTokens,
    SinkWindow,
    SlidingWindow,
    Strided,
    build_pattern,
    dense_mask,
)
from sparse_nlp.attention.spec import MaskSpec, left_shift
from sparse_nlp.config import AttentionSparsity, ConfigError, SparsityConfig
from sparse_nlp.native import build

GRAD_WEIGHT_SEED = 7  # the random output weights of the gradient tests (not the global RNG: reproducible)


def brute(pattern, n: int) -> torch.Tensor:
    """The pattern's mask written out position by position, straight from its definition."""
    out = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            d = q - k
            if isinstance(pattern, SlidingWindow):
                ok = 0 <= d < pattern.window if pattern.causal else abs(d) <= pattern.window // 2
            elif isinstance(pattern, GlobalTokens):
                ok = (q in pattern.positions or k in pattern.positions) and (not pattern.causal or k <= q)
            elif isinstance(pattern, SinkWindow):
                ok = k <= q and (d < pattern.window or k < pattern.sinks)
            elif isinstance(pattern, DilatedWindow):
                reach = (pattern.window // 2) * pattern.dilation
                ok = d % pattern.dilation == 0 and (
                    0 <= d < pattern.window * pattern.dilation if pattern.causal else abs(d) <= reach
                )
            elif isinstance(pattern, Strided):
                ok = (abs(d) < pattern.stride or d % pattern.stride == 0) and (not pattern.causal or k <= q)
            elif isinstance(pattern, Fixed):
                ok = (
                    q // pattern.block == k // pattern.block
                    or k % pattern.block >= pattern.block - pattern.summary
                ) and (not pattern.causal or k <= q)
            else:
                raise AssertionError(pattern)
            out[q, k] = ok
    return out


PATTERNS = [
    SlidingWindow(6),
    SlidingWindow(5, causal=True),
    GlobalTokens((0, 7)),
    GlobalTokens((2,), causal=True),
    SinkWindow(window=4, sinks=2),
    DilatedWindow(6, dilation=3),
    DilatedWindow(3, dilation=2, causal=True),
    Strided(4),
    Strided(3, causal=False),
    Fixed(5, 2),
    Fixed(4, 1, causal=False),
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.key())
def test_pattern_matches_brute_force(pattern):
    pos = torch.arange(19)
    got = dense_mask(pattern, pos, pos)[0]
    assert torch.equal(got, brute(pattern, 19))


def test_union_is_or_of_parts_and_round_trips_json():
    u = SlidingWindow(4) | GlobalTokens((0,)) | Strided(5, causal=False)
    pos = torch.arange(17)
    want = brute(SlidingWindow(4), 17) | brute(GlobalTokens((0,)), 17) | brute(Strided(5, causal=False), 17)
    assert torch.equal(dense_mask(u, pos, pos)[0], want)
    again = build_pattern(u.name, u.options())
    assert again == u
    cfg = SparsityConfig(attention=AttentionSparsity(u.name, u.options(), kernel="blocked"))
    assert SparsityConfig.from_json(cfg.to_json()) == cfg


def test_bigbird_is_seeded_and_has_window_global_random():
    p = BigBird(block_size=4, window_blocks=3, global_blocks=1, random_blocks=2, random_span=8, seed=3)
    pos = torch.arange(64)
    m = dense_mask(p, pos, pos)[0]
    assert torch.equal(m, dense_mask(BigBird(**{**p.options(), "seed": 3}), pos, pos)[0])
    assert not torch.equal(m, dense_mask(BigBird(**{**p.options(), "seed": 4}), pos, pos)[0])
    blocks = m.view(16, 4, 16, 4).any(3).any(1)  # (query block, key block)
    assert torch.equal(m.view(16, 4, 16, 4).all(3).all(1), blocks)  # whole blocks only
    assert blocks[0].all() and blocks[:, 0].all()  # global block
    i = torch.arange(16)
    assert blocks[i, i].all() and blocks[i[1:], i[:-1]].all() and blocks[i[:-1], i[1:]].all()
    extra = blocks.sum() - (16 + 15 + 15 + 15 + 14)  # beyond window and global (overlaps removed)
    assert extra > 0  # random blocks exist
    pos128 = torch.arange(128)
    assert torch.equal(dense_mask(p, pos128, pos128)[0][:64, :64], m)  # the same blocks at every length


@pytest.mark.parametrize(
    ("name", "options", "field"),
    [
        ("sliding_window", {"window": 0}, "window"),
        ("sliding_window", {"window": -3, "causal": True}, "window"),
        ("sink_window", {"window": 8, "sinks": -1}, "sinks"),
        ("global_tokens", {"positions": ["cls"]}, "positions"),
        ("sliding_window", {"windw": 8}, "windw"),
        ("bigbird", {"random_blocks": 4, "random_span": 2}, "random_span"),
        ("no_such_pattern", {}, "pattern"),
    ],
)
def test_bad_options_fail_naming_the_field(name, options, field):
    with pytest.raises(AttentionPatternError, match=field):
        build_pattern(name, options)
    with pytest.raises(ConfigError, match=rf"attention\.(options\.|pattern|.*{field})"):
        SparsityConfig(attention=AttentionSparsity(name, options)).validate()


def test_bad_kernel_name_fails():
    with pytest.raises(ConfigError, match="kernel"):
        SparsityConfig(attention=AttentionSparsity("sliding_window", {"window": 4}, kernel="fast")).validate()


# ---- kernels ----------------------------------------------------------------------------------------------

BAND_PATTERNS = [
    SlidingWindow(8),
    SlidingWindow(5, causal=True),
    SlidingWindow(10) | GlobalTokens((0, 3)),
    SlidingWindow(6) | GlobalTokens((0, 2, 9, 20, 30, 35)),  # more than 4 globals: merged by one product
    SlidingWindow(4) | GlobalTokens(tuple(range(0, 36, 2))),  # 18 globals: per-head products, two key chunks
    SinkWindow(window=6, sinks=2),
    GlobalTokens((1,), causal=True) | SlidingWindow(4, causal=True),
]


def _inputs(
    pad: str, n: int = 37, batch: int = 3, seed: int = 0, dtype=torch.float32, dim: int = 8, device="cpu"
):
    """Random q (4 heads), k and v (GQA: 2 KV heads), drawn on the CPU and moved to `device`, and the (B, N)
    real-token mask: with padding, rows 1 and the last one (row 2 at batch 3) are padded."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, h, n, dim, generator=g, dtype=dtype) for h in (4, 2, 2))
    q, k, v = (t.to(device).requires_grad_() for t in (q, k, v))
    real = torch.ones(batch, n, dtype=torch.bool)
    if pad == "right":
        real[1, n - 7 :] = False
        real[batch - 1, 5:] = False
    elif pad == "left":
        real[1, :7] = False
        real[batch - 1, :1] = False
    return q, k, v, real.to(device)


def _spec(pattern, real, pad, block=16, kernel="auto"):
    n = real.shape[1]
    pos = torch.arange(n, device=real.device)
    return MaskSpec(
        pattern,
        kernel,
        real.shape[0],
        pos,
        pos,
        padding=None if pad == "none" else real,
        shift=left_shift(real),
        block_size=block,
    )


def check_blocked_against_reference(q, k, v, spec, close=None) -> torch.Tensor:
    """The blocked kernel's output and its gradients for q, k, v equal the reference kernel's (`close(out, ref)`,
    by default within 1e-5); returns the blocked output."""
    close = close or (lambda out, ref: (out - ref).abs().max() < 1e-5)
    ref = reference_attention(q, k, v, spec, 0.3)
    out = blocked_attention(q, k, v, spec, 0.3)
    assert close(out, ref)
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(GRAD_WEIGHT_SEED)).to(ref.device)
    g_ref = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    g_out = torch.autograd.grad((out * weight).sum(), (q, k, v))
    for a, b in zip(g_ref, g_out, strict=True):
        assert close(b, a)
    return out


# head size 8: the flash-op path; 16: the native kernel where it runs (test_native_kernel_builds_here says where)
@pytest.mark.parametrize("dim", [8, 16])
@pytest.mark.parametrize("pad", ["none", "right", "left"])
@pytest.mark.parametrize("pattern", BAND_PATTERNS, ids=lambda p: p.key())
def test_blocked_equals_reference_values_and_gradients(pattern, pad, dim):
    q, k, v, real = _inputs(pad, dim=dim)  # 37 tokens: not a multiple of the block of 16
    check_blocked_against_reference(q, k, v, _spec(pattern, real, pad))


@pytest.mark.parametrize("pad", ["none", "right", "left"])
@pytest.mark.parametrize("pattern", BAND_PATTERNS, ids=lambda p: p.key())
def test_blocked_masked_sdpa_path_equals_reference(pattern, pad, monkeypatch):
    """The masked-SDPA path, which a GPU takes (the flash op is CPU-only), forced on the CPU: its values and
    gradients without dropout. The device dispatch itself and CUDA's non-contiguous SDPA outputs are checked only
    by tests/test_attention_cuda.py."""
    import sparse_nlp.attention.kernels.blocked as blocked_module

    monkeypatch.setattr(blocked_module, "_FLASH_LSE", False)
    calls = []
    concat = blocked_module._concat_attention
    monkeypatch.setattr(blocked_module, "_concat_attention", lambda *a: calls.append(1) or concat(*a))
    q, k, v, real = _inputs(pad)
    check_blocked_against_reference(q, k, v, _spec(pattern, real, pad))
    assert calls == [1]


@pytest.mark.parametrize("dim", [8, 32])
@pytest.mark.parametrize("n", [150, 160])  # 160: a multiple of the forward block (no padded query rows)
@pytest.mark.parametrize("pad, batch", [("none", 1), ("left", 3)])
@pytest.mark.parametrize(
    "pattern",
    [
        SlidingWindow(20) | GlobalTokens((0,)),
        SinkWindow(window=20, sinks=2),
        GlobalTokens((1,), causal=True) | SlidingWindow(12, causal=True),
    ],
    ids=lambda p: p.key(),
)
def test_blocked_default_blocks_two_layers_share_one_spec(pattern, pad, batch, n, dim):
    """Default block sizes (forward 32, backward 128: two plans) at a length that is a multiple of neither,
    and two "layers" calling the kernel with one spec, as a model does: the padded key/value buffers the plan
    reuses between calls must not leak one layer's keys into the other's values or gradients. Batch 1 gets
    q/k/v in the (B, N, H, D)-transposed layout that transformers' attention layers pass."""
    leaves, layers = [], []
    for seed in (1, 2):
        q, k, v, real = _inputs(pad, n=n, batch=batch, seed=seed, dim=dim)
        if batch == 1:  # leaves in (B, N, H, D); the kernel sees transposed views
            q, k, v = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
            leaves += [q, k, v]
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        else:
            leaves += [q, k, v]
        layers.append((q, k, v))
    spec = _spec(pattern, real, pad, block=0)
    outs = [blocked_attention(q, k, v, spec, 0.3) for q, k, v in layers]
    refs = [reference_attention(q, k, v, spec, 0.3) for q, k, v in layers]
    for out, ref in zip(outs, refs, strict=True):
        assert (out - ref).abs().max() < 1e-5
    weight = torch.randn(refs[0].shape, generator=torch.Generator().manual_seed(GRAD_WEIGHT_SEED))
    g_ref = torch.autograd.grad(((refs[0] + refs[1]) * weight).sum(), leaves)
    g_out = torch.autograd.grad(((outs[0] + outs[1]) * weight).sum(), leaves)
    for a, b in zip(g_ref, g_out, strict=True):
        # at head size 32 these gradients reach |g| of about 10, and float32 rounding follows the size of the terms
        # summed, not of each result: absolute 1e-5 plus 2e-6 of the largest gradient (an unseeded weight once gave
        # 1.1e-5 on an element of 0.12, beside gradients of 10)
        assert (b - a).abs().max() <= 1e-5 + 2e-6 * a.abs().max()
    assert {key[2] for key in spec.cache if key[0] == "blocked"} == {32, 128}


def test_blocked_workspace_reuse_across_lengths():
    """The padded key/value buffers are reused from call to call (per thread): inputs of different lengths,
    including two with the same padded length, in a row, each still equal the reference."""
    pattern = SlidingWindow(20) | GlobalTokens((0,))
    for n in (160, 150, 160, 37, 150):
        q, k, v, real = _inputs("none", n=n, seed=n)
        spec = _spec(pattern, real, "none", block=0)
        with torch.no_grad():
            out = blocked_attention(q, k, v, spec, 0.3)
            assert (out - reference_attention(q, k, v, spec, 0.3)).abs().max() < 1e-5


def _cpu_isa() -> str:
    """The path the kernel should pick here, from torch's own CPU probe."""
    capability = torch.backends.cpu.get_cpu_capability()
    return (
        "avx512"
        if "AVX512" in capability or capability == "AMX"
        else "avx2"
        if "AVX2" in capability
        else "portable"
    )


def test_native_kernel_builds_here():
    """Where the native kernel can run (a C++ compiler, as on the CI machine) it builds and runs the best path the
    CPU has (AVX-512, AVX2+FMA, else portable C++); elsewhere its status says why not."""
    reason = native.unavailable_reason()
    assert native.status() == (f"ready ({_cpu_isa()})" if reason is None else reason)
    if reason is None:
        assert native.isa() == _cpu_isa()


@pytest.fixture(params=["best", "portable"])
def native_isa(request):
    """Each native test once on the CPU's best path and once on the forced portable C++ path."""
    if request.param == "best":
        yield native.isa()
        return
    with native.forced_isa(request.param) as used:
        assert used == native.isa() == "portable"
        yield used
    assert native.isa() == _cpu_isa()  # the cap is lifted after the block


@pytest.mark.skipif(native.unavailable_reason() is not None, reason="the native kernel cannot run here")
@pytest.mark.parametrize("pad", ["right", "left"])
@pytest.mark.parametrize("pattern", BAND_PATTERNS, ids=lambda p: p.key())
def test_native_paths_equal_reference_values_and_gradients(pattern, pad, native_isa):
    """Every ISA path of the native forward (the backward is the flash op's) against the reference kernel."""
    q, k, v, real = _inputs(pad, dim=16)
    assert native.usable(q)
    check_blocked_against_reference(q, k, v, _spec(pattern, real, pad))


@pytest.mark.skipif(native.unavailable_reason() is not None, reason="the native kernel cannot run here")
def test_native_portable_path_only_when_asked_for(monkeypatch):
    """A CPU with neither AVX2 nor AVX-512 keeps the (faster) flash-op path unless the portable path is forced."""
    q = torch.randn(1, 2, 40, 16)
    assert native.usable(q)
    monkeypatch.setitem(native._STATE, "best", 0)  # as on a CPU without AVX2
    assert not native.usable(q)
    with native.forced_isa("portable"):
        assert native.usable(q)


@pytest.mark.skipif(native.unavailable_reason() is not None, reason="the native kernel cannot run here")
def test_native_isa_from_the_environment(monkeypatch):
    """$SPARSE_NLP_BAND_ISA caps the path when the library is loaded; a bad name is a clear error."""
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setenv(native.ENV_ISA, "portable")
    try:
        assert native.isa() == "portable"
        monkeypatch.setattr(native, "_STATE", {})
        monkeypatch.setenv(native.ENV_ISA, "sse9")
        with pytest.raises(
            ValueError, match="SPARSE_NLP_BAND_ISA='sse9' is not one of portable, avx2, avx512"
        ):
            native.ops()
    finally:
        monkeypatch.delenv(native.ENV_ISA)
        monkeypatch.setattr(native, "_STATE", {})
        assert native.isa() == _cpu_isa()


@pytest.mark.skipif(native.unavailable_reason() is not None, reason="the native kernel cannot run here")
def test_native_kernel_runs_the_band_and_equals_the_flash_path(monkeypatch, native_isa):
    calls = []
    ops = native.ops()

    class Counted:
        def band_forward(self, *args):
            calls.append(args[0].shape)
            return ops.band_forward(*args)

        global_rows = staticmethod(ops.global_rows)

    q, k, v, real = _inputs("left", n=150, dim=32)
    pattern = SlidingWindow(20) | GlobalTokens((0, 5))
    with torch.no_grad():
        monkeypatch.setattr(native, "ops", lambda: Counted())
        out = blocked_attention(q, k, v, _spec(pattern, real, "left", block=0), 0.3)
        assert len(calls) == 3  # one call per batch row
        with native.turned_off():
            flash = blocked_attention(q, k, v, _spec(pattern, real, "left", block=0), 0.3)
    assert len(calls) == 3
    assert (out - flash).abs().max() < 1e-5


@pytest.mark.skipif(native.unavailable_reason() is not None, reason="the native kernel cannot run here")
@pytest.mark.parametrize(("block", "dim", "threads"), [(3, 16, 1), (5, 64, 2), (8, 128, 1), (0, 32, 2)])
def test_native_kernel_block_and_head_sizes_and_threads(block, dim, threads, native_isa):
    """Blocks under 8 or not a multiple of 8 (8-row tiles then span two query blocks), every head size the kernel
    has, and two threads (tiles split between them)."""
    pattern = SlidingWindow(14) | GlobalTokens((0, 9))
    q, k, v, real = _inputs("left", n=70, dim=dim)
    spec = _spec(pattern, real, "left", block=block)
    scale = (
        dim**-0.5
    )  # the usual scale: 0.3 at head size 128 would make scores of +-10 and push both past 1e-5
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            out = blocked_attention(q, k, v, spec, scale)
    finally:
        torch.set_num_threads(before)
    assert native.usable(q)
    assert (out - reference_attention(q, k, v, spec, scale)).abs().max() < 1e-5


@pytest.mark.skipif(
    native.unavailable_reason() is not None or not torch._C.has_openmp or not build._compiler_is_gcc(),
    reason="the native kernel cannot run here, torch has no OpenMP, or the compiler is not GCC",
)
def test_native_kernel_runs_on_torchs_openmp_threads():
    """at::parallel_for is header code: compiled without OpenMP the kernel ran on one thread whatever
    torch.set_num_threads said. It must call into OpenMP, and the process must hold one OpenMP runtime (torch's)."""
    assert build.openmp_flags()[0] == ("-fopenmp",)
    assert native.ops() is not None
    assert b"GOMP_parallel" in Path(native._STATE["library"]).read_bytes()
    if Path("/proc/self/maps").exists():
        assert len(build.openmp_runtimes()) == 1, build.openmp_runtimes()


def test_native_openmp_flags_follow_torchs_runtime(monkeypatch, request):
    """The link names the file torch loaded (a hashed libgomp on some wheels); no GNU runtime or no GCC: no OpenMP."""
    # the next call sees the real runtime again, even after a failure here
    request.addfinalizer(build.openmp_flags.cache_clear)
    monkeypatch.setattr(build.torch._C, "has_openmp", True)
    monkeypatch.setattr(build, "_compiler_is_gcc", lambda: True)
    hashed = Path("/site/torch/lib/libgomp-a34b3233.so.1")
    for runtimes, expected in [
        ([hashed], (("-fopenmp",), ("-L/site/torch/lib", "-l:libgomp-a34b3233.so.1"))),
        ([Path("/opt/intel/libiomp5.so")], ((), ())),
        ([], ((), ())),
    ]:
        monkeypatch.setattr(build, "openmp_runtimes", lambda r=runtimes: r)
        build.openmp_flags.cache_clear()
        assert build.openmp_flags() == expected
    monkeypatch.setattr(build, "openmp_runtimes", lambda: [hashed])
    # clang's -fopenmp would call LLVM's libomp
    monkeypatch.setattr(build, "_compiler_is_gcc", lambda: False)
    build.openmp_flags.cache_clear()
    assert build.openmp_flags() == ((), ())


@pytest.mark.skipif(native.unavailable_reason() is not None, reason="the native kernel cannot run here")
def test_native_kernel_nan_reaches_the_rows_that_see_it(native_isa):
    """A NaN key turns exactly the rows that attend to it NaN (here the window around it and the global row);
    a NaN query turns its own row NaN; every other row is what it would be without the NaN."""
    q, k, v, real = _inputs("none", n=80, batch=1, dim=16)
    q, k, v = (x.detach().clone() for x in (q, k, v))
    pattern = SlidingWindow(10) | GlobalTokens((0,))
    spec = _spec(pattern, real, "none", block=0)
    clean = blocked_attention(q, k, v, spec, 0.3)
    k[:, :, 40] = float("nan")
    q[:, :, 70] = float("nan")
    with torch.no_grad():
        out = blocked_attention(q, k, v, spec, 0.3)
    sees_40 = torch.zeros(80, dtype=torch.bool)
    sees_40[35:46] = True  # window 10: five positions each side
    sees_40[0] = True  # the global row sees every key
    nan_rows = sees_40.clone()
    nan_rows[70] = True
    row_has_nan = out.isnan().any(dim=-1)  # (1, H, N)
    assert torch.equal(row_has_nan, nan_rows.expand_as(row_has_nan))
    assert (out[..., ~nan_rows, :] - clean[..., ~nan_rows, :]).abs().max() < 1e-6


def test_native_build_failure_warns_once_and_falls_back(monkeypatch, caplog):
    def failing_build():  # the shape of torch's message: the compiler's output, then ninja's last word
        raise RuntimeError(
            "Error building extension 'sparse_nlp_band': [1/2] c++ -MMD -c band_attention.cpp -o band.o\n"
            "FAILED: band.o\nband_attention.cpp:12:10: fatal error: immintrin.h: No such file or directory\n"
            "compilation terminated.\nninja: build stopped: subcommand failed."
        )

    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setattr(native, "unavailable_reason", lambda: None)
    monkeypatch.setattr(native, "_build", failing_build)
    q, k, v, real = _inputs("right", dim=16)
    spec = _spec(SlidingWindow(8) | GlobalTokens((0,)), real, "right")
    with caplog.at_level(logging.WARNING, logger=native.__name__), torch.no_grad():
        out = blocked_attention(q, k, v, spec, 0.3)
        blocked_attention(q, k, v, spec, 0.3)
    assert (out - reference_attention(q, k, v, spec, 0.3)).abs().max() < 1e-5
    assert native.status() == (
        "build failed: band_attention.cpp:12:10: fatal error: immintrin.h: No such file or directory"
    )
    assert len([r for r in caplog.records if "native band-attention kernel unavailable" in r.message]) == 1


def test_native_build_clears_a_stale_lock_and_loads_a_built_kernel_directly(monkeypatch, tmp_path, caplog):
    """A build killed half-way leaves `lock` behind, on which torch's builder would wait for ever: an old one is
    removed before building. A folder that already holds the built library is loaded without the builder."""
    import os
    import time

    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path))
    folder = native.cache_dir()
    folder.mkdir(parents=True)
    lock = folder / "lock"
    lock.touch()
    old = time.time() - build.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    built = folder / f"sparse_nlp_band_attention_{folder.name.rsplit('-', 1)[1]}.so"
    seen = []

    def fake_load(**kw):  # the builder writes the library (and loads it itself)
        seen.append((kw["build_directory"], lock.exists()))
        built.touch()

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(native, "_STATE", {})
    fake_ops = SimpleNamespace(band_set_isa=lambda cap: cap, band_cpu_isa=lambda: 0)
    monkeypatch.setattr(native.torch.ops, "sparse_nlp", fake_ops)
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        native._build()
    assert seen == [(str(folder), False)]
    assert "stale build lock" in caplog.text

    loaded = []
    monkeypatch.setattr(native.torch.ops, "load_library", lambda path: loaded.append(path))
    native._build()
    assert loaded == [str(built)] and len(seen) == 1  # the builder was not called again


def test_native_unavailable_reasons(monkeypatch):
    """Only the switch and a missing compiler stop it: every CPU has at least the portable path."""
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert "SPARSE_NLP_NATIVE=0" in native.unavailable_reason()
    monkeypatch.delenv(native.ENV_SWITCH)
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert "'no-such-compiler' is not on PATH" in native.unavailable_reason()


@pytest.mark.parametrize("pattern", BAND_PATTERNS[2:4], ids=lambda p: p.key())
def test_blocked_with_dropout_takes_the_concatenated_path(pattern):
    """With attention dropout the windows and global columns go through one SDPA call (its own dropout)."""
    q, k, v, real = _inputs("right")
    spec = _spec(pattern, real, "right")
    ref = reference_attention(q, k, v, spec, 0.3)
    out = blocked_attention(q, k, v, spec, 0.3, dropout=1e-12)  # never drops in practice: same values
    assert (out - ref).abs().max() < 1e-5
    g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    g_out = torch.autograd.grad(out.sum(), (q, k, v))
    for a, b in zip(g_ref, g_out, strict=True):
        assert (a - b).abs().max() < 1e-5


def test_reference_equals_masked_softmax_by_hand():
    q, k, v, real = _inputs("right", n=11)
    pattern = SlidingWindow(4) | GlobalTokens((0,))
    spec = _spec(pattern, real, "right")
    out = reference_attention(q, k, v, spec, 0.5)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = (q @ kk.transpose(-1, -2)) * 0.5
    mask = spec.dense()
    want = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ vv
    assert (out - want).abs().max() < 1e-5


@pytest.mark.parametrize(
    "pattern",
    [SlidingWindow(8), BigBird(block_size=4, random_blocks=1, random_span=4), Strided(4, causal=False)],
)
def test_flex_equals_reference_with_padding(pattern):
    for pad, n in (("right", 37), ("none", 128)):  # padded + bucketed, and an exact bucket without padding
        q, k, v, real = _inputs(pad, n=n)
        spec = _spec(pattern, real, pad)
        with torch.no_grad():
            ref = reference_attention(q, k, v, spec, 0.3)
            out = flex_attention_kernel(q, k, v, spec, 0.3, compile=False)
        assert (out - ref).abs().max() < 1e-5


def test_flex_refuses_autograd_and_auto_falls_back():
    q, k, v, real = _inputs("none", n=300)
    spec = _spec(BigBird(block_size=4), real, "none", kernel="flex")
    with pytest.raises(ValueError, match="backward"):
        flex_attention_kernel(q, k, v, spec, 0.3, compile=False)
    assert choose_kernel(spec, needs_grad=True) == "reference"
    assert choose_kernel(_spec(SlidingWindow(8), real, "none", kernel="flex"), needs_grad=True) == "blocked"
    assert choose_kernel(_spec(SlidingWindow(8), real, "none"), needs_grad=True) == "blocked"
    assert choose_kernel(_spec(SlidingWindow(8), real[:, :10], "none"), needs_grad=False) == "reference"


def _sliding_extra(window: int):
    """A model's own causal sliding window as transformers hands it over: a function of index tensors."""
    return lambda b, h, q, kv: (kv <= q) & (q - kv < window)


@pytest.mark.parametrize(
    ("pattern", "n", "model_window", "redundant"),
    [
        (SlidingWindow(5, causal=True), 40, 5, True),  # the same window: removes nothing
        (SlidingWindow(5, causal=True), 40, 4, False),  # narrower: it cuts the band
        (SinkWindow(window=5, sinks=2), 8, 8, True),  # the sinks lie inside the model's window at this length
        (SinkWindow(window=5, sinks=2), 40, 8, False),  # far queries lose their sinks
        (GlobalTokens((1,), causal=True) | SlidingWindow(4, causal=True), 9, 9, True),
        (GlobalTokens((1,), causal=True) | SlidingWindow(4, causal=True), 12, 9, False),
    ],
)
@pytest.mark.parametrize("pad", ["none", "left"])
def test_model_mask_is_dropped_only_when_it_removes_nothing(pattern, n, model_window, redundant, pad):
    q, k, v, real = _inputs(pad, n=n)
    spec = _spec(pattern, real, pad)
    spec.extra = _sliding_extra(model_window)
    with torch.no_grad():
        with_extra = reference_attention(q, k, v, spec, 0.3)
    assert spec.extra_is_redundant() == redundant
    if redundant:  # dropping it changes nothing, and the band kernel may run
        spec.extra = None
        with torch.no_grad():
            assert (blocked_attention(q, k, v, spec, 0.3) - with_extra).abs().max() < 1e-5


def test_kernel_choice_never_gives_flex_attention_dropout():
    """In train mode under no_grad (dropout on, no gradients) a long non-band pattern went to flex, which has no
    dropout and raised; the choice now sees the dropout and takes the reference kernel."""
    q, k, v, real = _inputs("none", n=1100, batch=1)
    spec = _spec(BigBird(block_size=4), real, "none")
    assert choose_kernel(spec, needs_grad=False) == "flex"
    assert choose_kernel(spec, needs_grad=False, dropout=0.1) == "reference"
    assert choose_kernel(_spec(BigBird(block_size=4), real, "none", kernel="flex"), False, 0.1) == "reference"
    with torch.no_grad():
        out = run_kernel(q, k, v, spec, 0.3, dropout=0.1)
    assert out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.slow
def test_flex_compiles_once_per_length_bucket():
    """Batches of varying size, length and padding inside one 128-bucket reuse one compiled graph."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pattern = SlidingWindow(16) | GlobalTokens((0,))
    graphs = []
    ref_err = 0.0
    for bsz, n, padded in [(2, 100, False), (1, 128, False), (3, 77, True), (2, 200, False), (4, 130, True)]:
        q = torch.randn(bsz, 2, n, 8)
        real = torch.ones(bsz, n, dtype=torch.bool)
        if padded:
            real[0, n - 7 :] = False
        pos = torch.arange(n)
        spec = MaskSpec(pattern, "flex", bsz, pos, pos, padding=real if padded else None)
        with torch.no_grad():
            out = flex_attention_kernel(q, q, q, spec, 0.3)
            ref = reference_attention(q, q, q, spec, 0.3)
        ref_err = max(ref_err, float((out - ref)[real.view(bsz, 1, n, 1).expand_as(out)].abs().max()))
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [1, 1, 1, 2, 2]  # one compile for bucket 128, one for bucket 256
    assert ref_err < 1e-5
    torch._dynamo.reset()
