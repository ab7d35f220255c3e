"""The native band-attention forward: a C++ kernel for CPUs, compiled on first use, ISA chosen at run time.

The blocked kernel's forward runs its band, its global key columns and its global query rows through this kernel
when it can: fp32 on the CPU, head size 16, 32, 64 or 128, and a C++ compiler on the machine. It computes the same
output and log-sum-exp as torch's flash-attention op on the key windows, in one pass and without the window copies
and log-sum-exp merges around the op (`benchmarks/attention_speed.py` measures both). The backward pass is
unchanged (the flash op's).

One library holds three code paths - AVX-512 (F, BW, VL, DQ), AVX2+FMA and portable C++ (any CPU, ARM included) -
and runs the best one the CPU supports (`isa`); ``SPARSE_NLP_BAND_ISA=portable`` (or ``avx2``, ``avx512``) caps it,
as does `forced_isa` within a block (tests, benchmarks). The portable path runs only when asked for that way: on an
AVX2 machine it measured about 5x slower than the flash-op path, so CPUs without AVX2 keep the flash op by default. The first use compiles `band_attention.cpp` through
`sparse_nlp.native.build_library` (ninja and the system C++ compiler; about 30-60 s) into the per-user kernel cache
``$SPARSE_NLP_CACHE/kernels`` (default ``~/.cache/sparse_nlp/kernels``, mode 0700), keyed by the source, the
compiler flags, the torch and Python versions and the compiler name; a built library is loaded only if the current
user owns it and its folder and neither is writable by others. Later processes load it at once.
`SPARSE_NLP_NATIVE=0` turns it off. Where it cannot run (no compiler, a failed build, a cache folder others can
write) the blocked kernel keeps its flash-op path, which gives the same values; a failed build is logged as a
warning once, with why.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from ....native import (
    ISAS,
    NativeBuildError,
    build_library,
    compiler_missing_reason,
    env_isa_cap,
    isa_index,
    native_disabled_reason,
    openmp_flags,
)
from ....native.build import first_error, library_folder

logger = logging.getLogger(__name__)

NAME = "band_attention"
SOURCE = Path(__file__).with_name("band_attention.cpp")
FLAGS = ("-O3",)
HEAD_SIZES = (16, 32, 64, 128)
ENV_SWITCH = "SPARSE_NLP_NATIVE"
ENV_CACHE = "SPARSE_NLP_CACHE"
ENV_ISA = "SPARSE_NLP_BAND_ISA"

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}
_OFF = threading.local()  # `turned_off` blocks active in this thread


def cache_dir() -> Path:
    """Folder of the compiled kernel for this source, these flags, this torch, this Python and this compiler name."""
    cflags, ldflags = openmp_flags()
    return library_folder(NAME, SOURCE, [*FLAGS, *cflags, *ldflags])


def unavailable_reason() -> str | None:
    """Why the native kernel cannot run on this machine, or None when it can be built."""
    return native_disabled_reason() or compiler_missing_reason()


def _isa_cap(name: str) -> int:
    return isa_index(name, ENV_ISA)


def _env_cap() -> int | None:
    """The path ``$SPARSE_NLP_BAND_ISA`` caps the kernel at, or None."""
    return env_isa_cap(ENV_ISA)


def _build():
    """Compile (once) and load the library; the path it runs is capped by ``$SPARSE_NLP_BAND_ISA`` if set."""
    cap = _env_cap()
    _STATE["library"] = build_library(NAME, SOURCE, FLAGS)
    op = torch.ops.sparse_nlp
    _STATE["cap"], _STATE["best"] = cap, int(op.band_cpu_isa())
    op.band_set_isa(len(ISAS) if cap is None else cap)
    return op


def ops():
    """The compiled ops (`band_forward`, `global_rows`), built on first call; None where they cannot run (`status`
    says why)."""
    if "op" in _STATE:  # the per-call fast path: no lock once built (or failed)
        return _STATE["op"]
    with _LOCK:
        if "op" not in _STATE:
            _env_cap()  # a bad $SPARSE_NLP_BAND_ISA is the caller's error, not a failed build
            reason, op = unavailable_reason(), None
            if reason is None:
                try:
                    op = _build()
                except NativeBuildError as err:
                    reason = str(err)
                except Exception as err:  # a compiler or linker error: keep the flash-op path, say why once
                    reason = f"build failed: {first_error(str(err)) or type(err).__name__}"
                if op is None:
                    logger.warning(
                        "sparse_nlp: native band-attention kernel unavailable (%s; build folder %s); using the "
                        "slower flash-op path",
                        reason,
                        cache_dir(),
                    )
            _STATE["reason"] = reason
            _STATE["op"] = op  # last: the lock-free path reads it
        return _STATE["op"]


def status() -> str:
    """'ready (<isa>)' once built, else why the native kernel is not used (builds it first if not yet tried)."""
    return f"ready ({isa()})" if ops() is not None else str(_STATE["reason"])


def isa() -> str | None:
    """The code path the kernel runs now: 'avx512', 'avx2' or 'portable'; None where it cannot run."""
    op = ops()
    return ISAS[_current()] if op is not None else None


def _current() -> int:
    """The path in use: the CPU's best, capped by the cap last set."""
    cap, best = _STATE.get("cap"), int(_STATE["best"])
    return best if cap is None else min(best, int(cap))


@contextlib.contextmanager
def forced_isa(name: str) -> Iterator[str]:
    """Within this block the kernel runs at most path `name` ('portable', 'avx2', 'avx512'; the CPU's best when it
    lacks that one), in every thread; yields the path it runs. Raises NativeBuildError where it cannot run."""
    op = ops()
    if op is None:
        raise NativeBuildError(f"the native band-attention kernel cannot run here: {_STATE['reason']}")
    before = _STATE.get("cap")
    _STATE["cap"] = _isa_cap(name)
    try:
        yield ISAS[int(op.band_set_isa(_STATE["cap"]))]
    finally:
        _STATE["cap"] = before
        op.band_set_isa(len(ISAS) if before is None else before)


@contextlib.contextmanager
def turned_off():
    """Within this block (in this thread) the blocked kernel takes its flash-op path: for side-by-side timing."""
    _OFF.depth = getattr(_OFF, "depth", 0) + 1
    try:
        yield
    finally:
        _OFF.depth -= 1


def usable(query: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the native kernel can run attention on `query` (and `others`: the keys and values, which must have
    its head count and head size); builds the kernel on first call."""
    return (
        not getattr(_OFF, "depth", 0)
        and query.device.type == "cpu"
        and query.dtype == torch.float32
        and query.shape[-1] in HEAD_SIZES
        and all(
            x.dtype == query.dtype and x.shape[-1] == query.shape[-1] and x.shape[1] == query.shape[1]
            for x in others
        )
        and ops() is not None
        and (_current() > 0 or _STATE.get("cap") == 0)  # portable C++ only when asked for: see the module doc
    )


__all__ = [
    "ENV_CACHE",
    "ENV_ISA",
    "ENV_SWITCH",
    "HEAD_SIZES",
    "ISAS",
    "cache_dir",
    "forced_isa",
    "isa",
    "ops",
    "status",
    "turned_off",
    "unavailable_reason",
    "usable",
]
