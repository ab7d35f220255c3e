"""The native sparse-linear kernel (`sparse_linear.cpp`): compiled on first use, ISA chosen at run time.

The first call of `ops` compiles the source once per machine and user (about 30-40 s with GCC; later processes
load the cached library in well under a second; see `sparse_nlp.native.build`). The library holds three code paths
(AVX-512F, AVX2+FMA, portable C++) and picks the best one the CPU supports; ``SPARSE_NLP_RUNTIME_ISA=portable``
(or ``avx2``, ``avx512``) caps it, e.g. for tests. Without a compiler, or when the build fails, `ops` returns None
after one warning, and converted layers run the dense product instead.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ...native import ISAS, NativeKernel, build_library

SOURCE = Path(__file__).with_name("sparse_linear.cpp")
FLAGS = ("-O3",)
ENV_ISA = "SPARSE_NLP_RUNTIME_ISA"
ACTIVATIONS = {"gelu": 1}
"""Activations the kernels apply to their output tile before writing it (the op's ``activation`` code; 0: none).
``gelu`` is the erf form (``torch.nn.functional.gelu`` with ``approximate="none"``)."""


def _build() -> None:
    build_library("sparse_linear", SOURCE, FLAGS)


_KERNEL = NativeKernel(
    "sparse_nlp_runtime",
    lambda: _build(),  # looked up at call time (tests replace it)
    what="sparse-linear",
    fallback="converted layers run the dense product",
    env_isa=ENV_ISA,
)
ops = _KERNEL.ops
status = _KERNEL.status
load_seconds = _KERNEL.load_seconds
best_isa = _KERNEL.best_isa
_reset = _KERNEL.reset


def _overload(name: str):
    """``torch.ops.sparse_nlp_runtime.<name>.default`` (the overload itself: no lookup per call), or None where the
    kernel is unavailable; looked up once."""
    return _KERNEL.cached(name, lambda: None if ops() is None else getattr(ops(), name).default)


def sparse_linear():
    """The compressed-rows op, or None where the kernel is unavailable."""
    return _overload("sparse_linear")


def block_linear():
    """The block-sparse op, or None where the kernel is unavailable."""
    return _overload("block_linear")


def nm_linear():
    """The N:M op, or None where the kernel is unavailable."""
    return _overload("nm_linear")


def source_digest() -> str:
    """A short digest of the kernel source: autotune decisions are keyed by it, so a changed kernel re-tunes."""
    return _KERNEL.cached("digest", lambda: hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12])  # type: ignore[return-value]


def isa_name(isa: int) -> str:
    return ISAS[isa]


__all__ = [
    "ACTIVATIONS",
    "ENV_ISA",
    "ISAS",
    "best_isa",
    "block_linear",
    "isa_name",
    "load_seconds",
    "nm_linear",
    "ops",
    "source_digest",
    "sparse_linear",
    "status",
]
