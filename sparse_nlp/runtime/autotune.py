"""Per-layer choice of the fastest product (dense, torch CSR, native kernel), timed on the layer's own shape.

For each token bucket the candidates run on a random input of that many tokens, interleaved (one call of each per
round, so a load change hits all of them), and the fastest call of each is compared; a sparse method must beat dense by `margin` to be
chosen, so a layer that is not sparse enough stays dense. Decisions are cached on disk in
``$SPARSE_NLP_CACHE/runtime_autotune.json`` (default ``~/.cache/sparse_nlp``), keyed by CPU model, ISA, kernel
source, torch version, threads, shape, density (2 decimals), bias and bucket. The 1-token bucket (decoding) is timed with
weights that are not in cache (`COLD_BYTES`): there a sparse layer wins by reading fewer bytes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from . import kernels
from .formats import PackedWeight

logger = logging.getLogger(__name__)

CACHE_FILE = "runtime_autotune.json"
COLD_BYTES = 96 << 20
"""The 1-token bucket is timed over copies of the weight totalling this much (more than a last-level cache), used
in turn, so each call reads its weight from memory, as in decoding, where a model's weights do not stay cached."""
MAX_COPIES = 64
_MEMO: dict[str, str] = {}


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else platform.processor()."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cache_path() -> Path:
    root = os.environ.get("SPARSE_NLP_CACHE")
    base = (
        Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparse_nlp"
    )
    return base / CACHE_FILE


def _read_cache() -> dict[str, str]:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return (
        {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}
        if isinstance(data, dict)
        else {}
    )


def _write_cache(entries: dict[str, str]) -> None:
    """Merge `entries` into the cache file (atomic replace; a failure only costs a re-tune later)."""
    path = cache_path()
    with contextlib.suppress(OSError):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = _read_cache()
        data.update(entries)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".autotune-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=0, sort_keys=True)
        os.replace(tmp, path)


def key(
    csr: PackedWeight, has_bias: bool, bucket: int, threads: int, isa: str, methods: Sequence[str]
) -> str:
    out_f, in_f = csr.shape
    return (
        f"{cpu_model()}|{isa} {kernels.source_digest()}|torch {torch.__version__}|threads {threads}|{out_f}x{in_f}|"
        f"{csr.kind}|density "
        f"{csr.density:.2f}|bias {int(has_bias)}|tokens {bucket}{' cold' if bucket == 1 else ''}|{','.join(methods)}"
    )


def _runners(csr: PackedWeight, bias: torch.Tensor | None, methods: Sequence[str]) -> dict[str, Callable]:
    runners: dict[str, Callable] = {}
    if "dense" in methods:
        dense = csr.to_dense()
        runners["dense"] = lambda x: F.linear(x, dense, bias)
    if "torch_csr" in methods:
        sparse = csr.to_torch_csr()
        runners["torch_csr"] = lambda x: (sparse @ x.t()).t() + (bias if bias is not None else 0)
    if "native" in methods and kernels.ops() is not None:
        isa = kernels.best_isa()
        runners["native"] = lambda x: csr.run(x, bias, isa)
    return runners


class _Rotate:
    """Calls the next of `fns` each time (each on its own copy of the weight)."""

    def __init__(self, fns: list[Callable]) -> None:
        self.fns, self.i = fns, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.i = (self.i + 1) % len(self.fns)
        return self.fns[self.i](x)


def _cold_runners(
    csr: PackedWeight, bias: torch.Tensor | None, methods: Sequence[str]
) -> dict[str, Callable]:
    """Runners that each use the next of several weight copies (made oldest-first, so the first used are out of
    cache)."""
    dense_bytes = csr.shape[0] * csr.shape[1] * 4
    copies = max(2, min(MAX_COPIES, COLD_BYTES // max(1, dense_bytes) + 1))
    per_copy = [_runners(csr.clone(), bias, methods) for _ in range(copies)]
    return {name: _Rotate([r[name] for r in per_copy]) for name in per_copy[0]}


def time_methods(
    runners: dict[str, Callable], x: torch.Tensor, rounds: int = 5, warmup: int = 2
) -> dict[str, float]:
    """Fastest seconds per call of each runner on `x`, the runners interleaved in every round.

    The minimum, not the median: on a shared machine a call can wait for other processes, and that wait says
    nothing about which product is faster. For the same reason a 1-thread call is timed by the thread's CPU time
    (the time it waits for other processes is left out); with more threads, by elapsed time."""
    now = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in runners}
    with torch.inference_mode():
        for _ in range(warmup):
            for run in runners.values():
                run(x)
        for _ in range(rounds):
            for name, run in runners.items():
                start = now()
                run(x)
                times[name].append(now() - start)
    return {name: min(ts) for name, ts in times.items()}


def machine_busy() -> bool:
    """Whether other work competes for the CPU: the 1-minute load average above the CPU count (False where the
    platform has no load average). Timings taken then are not written to the disk cache."""
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1)
    except (AttributeError, OSError):
        return False


def choose(
    csr: PackedWeight,
    bias: torch.Tensor | None,
    buckets: Sequence[int],
    methods: Sequence[str] = ("dense", "torch_csr", "native"),
    *,
    margin: float = 1.1,
    use_cache: bool = True,
) -> dict[int, str]:
    """The fastest of `methods` for each token bucket (dense unless another is `margin` times faster)."""
    threads = torch.get_num_threads()
    isa = kernels.isa_name(kernels.best_isa()) if kernels.ops() is not None else "none"
    methods = tuple(m for m in methods if m != "native" or kernels.ops() is not None)
    keys = {b: key(csr, bias is not None, b, threads, isa, methods) for b in buckets}
    stored = _read_cache() if use_cache else {}
    plan: dict[int, str] = {}
    fresh: dict[str, str] = {}
    runners: dict[str, Callable] | None = None
    for bucket in buckets:
        k = keys[bucket]
        known = (_MEMO.get(k) or stored.get(k)) if use_cache else None
        if known in methods:
            plan[bucket] = known
            continue
        x = torch.randn(bucket, csr.shape[1])  # (T, K)
        if bucket == 1:  # decoding: weights come from memory, not from cache
            times = time_methods(_cold_runners(csr, bias, methods), x, rounds=7)
        else:
            if runners is None:
                runners = _runners(csr, bias, methods)
            rounds = 3 if bucket * csr.nnz > 50_000_000 else 7
            times = time_methods(runners, x, rounds=rounds)
        best = min(times, key=times.get)
        if "dense" in times and times[best] * margin > times["dense"]:
            best = "dense"
        plan[bucket] = best
        fresh[k] = best
    if fresh:
        _MEMO.update(fresh)
        if use_cache and not machine_busy():
            _write_cache(fresh)
        elif use_cache:  # a busy machine's timings would be kept for good: this process uses them, no other
            logger.info(
                "sparse_nlp: the machine is busy (load average above the CPU count); %d autotune decisions are kept "
                "for this process only, not written to %s",
                len(fresh),
                cache_path(),
            )
    return plan


def clear_memory_cache() -> None:
    """Forget the decisions made in this process (the disk cache stays)."""
    _MEMO.clear()


__all__ = [
    "CACHE_FILE",
    "cache_path",
    "choose",
    "clear_memory_cache",
    "cpu_model",
    "key",
    "machine_busy",
    "time_methods",
]
