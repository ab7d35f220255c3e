"""The native sparse-linear kernel (`sparse_linear.cpp`): compiled on first use, ISA chosen at run time.

The first call of `ops` compiles the source once per machine and user (about 30-40 s with GCC; later processes
load the cached library in well under a second; see `sparse_nlp.native.build`). The library holds three code paths
(AVX-512F, AVX2+FMA, portable C++) and picks the best one the CPU supports; ``SPARSE_NLP_RUNTIME_ISA=portable``
(or ``avx2``, ``avx512``) caps it, e.g. for tests. Without a compiler, or when the build fails, `ops` returns None
after one warning, and converted layers run the dense product instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

import torch

from ...native import ISAS, NativeBuildError, build_library, env_isa_cap

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("sparse_linear.cpp")
FLAGS = ("-O3",)
ENV_ISA = "SPARSE_NLP_RUNTIME_ISA"

ACTIVATIONS = {"gelu": 1}
"""Activations the kernels apply to their output tile before writing it (the op's ``activation`` code; 0: none).
``gelu`` is the erf form (``torch.nn.functional.gelu`` with ``approximate="none"``)."""

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}
_ISA_MEMO: dict[str | None, int] = {}


def _build() -> None:
    build_library("sparse_linear", SOURCE, FLAGS)


def ops():
    """``torch.ops.sparse_nlp_runtime`` (built on first call), or None where it cannot be built (`status` says why;
    one warning is logged)."""
    if "op" in _STATE:  # the per-call fast path: no lock once built (or failed)
        return _STATE["op"]
    with _LOCK:
        if "op" not in _STATE:
            op, reason = None, None
            start = time.perf_counter()
            try:
                _build()
                op = torch.ops.sparse_nlp_runtime
            except NativeBuildError as err:
                reason = str(err)
                logger.warning(
                    "sparse_nlp: the native sparse-linear kernel is unavailable (%s); converted layers run the "
                    "dense product",
                    reason,
                )
            _STATE["reason"] = reason
            _STATE["seconds"] = time.perf_counter() - start
            _STATE["op"] = op  # last: the lock-free path reads it
        return _STATE["op"]


def status() -> str:
    """'ready (<isa>)' once built, else why the native kernel is not used."""
    return f"ready ({isa_name(best_isa())})" if ops() is not None else str(_STATE["reason"])


def load_seconds() -> float | None:
    """Seconds the first `ops` call took (the compile, or loading the cached library); None before it."""
    return _STATE.get("seconds")  # type: ignore[return-value]


def best_isa() -> int:
    """The code path the kernel runs: the CPU's best (0 portable, 1 AVX2+FMA, 2 AVX-512F), capped by
    ``$SPARSE_NLP_RUNTIME_ISA`` (read on every call, so a test can change it; the answer is memoized per value)."""
    raw = os.environ.get(ENV_ISA)
    isa = _ISA_MEMO.get(raw)
    if isa is not None:
        return isa
    op = ops()
    if op is None:
        return 0
    if "cpu_isa" not in _STATE:
        _STATE["cpu_isa"] = int(op.cpu_isa())
    isa = _STATE["cpu_isa"]
    cap = env_isa_cap(ENV_ISA)
    isa = isa if cap is None else min(isa, cap)
    _ISA_MEMO[raw] = isa
    return isa


def _overload(name: str):
    """``torch.ops.sparse_nlp_runtime.<name>.default`` (the overload itself: no lookup per call), or None where the
    kernel is unavailable; looked up once."""
    if name not in _STATE:
        op = ops()
        _STATE[name] = None if op is None else getattr(op, name).default
    return _STATE[name]


def sparse_linear():
    """The compressed-rows op, or None where the kernel is unavailable."""
    return _overload("sparse_linear")


def block_linear():
    """The block-sparse op, or None where the kernel is unavailable."""
    return _overload("block_linear")


def source_digest() -> str:
    """A short digest of the kernel source: autotune decisions are keyed by it, so a changed kernel re-tunes."""
    if "digest" not in _STATE:
        _STATE["digest"] = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    return _STATE["digest"]  # type: ignore[return-value]


def isa_name(isa: int) -> str:
    return ISAS[isa]


def _reset() -> None:
    """Forget the build result (tests)."""
    with _LOCK:
        _STATE.clear()
        _ISA_MEMO.clear()


__all__ = [
    "ACTIVATIONS",
    "ENV_ISA",
    "ISAS",
    "best_isa",
    "block_linear",
    "isa_name",
    "load_seconds",
    "ops",
    "source_digest",
    "sparse_linear",
    "status",
]
