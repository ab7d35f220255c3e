"""The native activation-sparse linear kernel (``runtime/kernels/activation_linear.cpp``), built on first use.

`ops` compiles the source once per machine and user through `sparse_nlp.native.build_library` (later processes load
the cached library) and returns ``torch.ops.sparse_nlp_activation``, or None after one warning where it cannot be
built (no compiler, ``SPARSE_NLP_NATIVE=0``, a build error): the layers then run the dense product on the zeroed
input. The library holds AVX-512F, AVX2+FMA and portable code paths and runs the best one the CPU has;
``SPARSE_NLP_RUNTIME_ISA=portable`` (or ``avx2``, ``avx512``) caps it, e.g. for tests.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from ..native import ISAS, NativeBuildError, build_library, env_isa_cap

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parents[1] / "runtime" / "kernels" / "activation_linear.cpp"
FLAGS = ("-O3",)
ENV_ISA = "SPARSE_NLP_RUNTIME_ISA"

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


def ops():
    """``torch.ops.sparse_nlp_activation`` (built on first call), or None where it cannot be built (one warning)."""
    if "op" in _STATE:
        return _STATE["op"]
    with _LOCK:
        if "op" not in _STATE:
            op, reason = None, None
            try:
                build_library("activation_linear", SOURCE, FLAGS)
                op = torch.ops.sparse_nlp_activation
            except NativeBuildError as err:
                reason = str(err)
                logger.warning(
                    "sparse_nlp: the native activation-sparse kernel is unavailable (%s); layers run the dense "
                    "product on the zeroed input",
                    reason,
                )
            _STATE["reason"] = reason
            _STATE["op"] = op
        return _STATE["op"]


def status() -> str:
    """'ready (<isa>)' once built, else why the native kernel is not used."""
    return f"ready ({ISAS[best_isa()]})" if ops() is not None else str(_STATE["reason"])


def best_isa() -> int:
    """The code path used: the CPU's best (0 portable, 1 AVX2+FMA, 2 AVX-512F), capped by ``$SPARSE_NLP_RUNTIME_ISA``."""
    op = ops()
    if op is None:
        return 0
    if "cpu_isa" not in _STATE:
        _STATE["cpu_isa"] = int(op.cpu_isa())
    isa = int(_STATE["cpu_isa"])  # type: ignore[arg-type]
    cap = env_isa_cap(ENV_ISA)
    return isa if cap is None else min(isa, cap)


def activation_linear(
    x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, threshold: float
) -> torch.Tensor:
    """(T, in) x, (in, out) contiguous transposed weight -> (T, out): the product with ``|x| <= threshold`` zeroed.

    Runs the native kernel when it is built; otherwise the same product with torch (dense).
    """
    op = ops()
    if op is None:
        kept = torch.where(x.abs() > threshold, x, torch.zeros((), dtype=x.dtype))
        out = kept @ weight_t  # (T, out)
        return out if bias is None else out + bias
    return op.activation_linear(x, weight_t, bias, float(threshold), best_isa())


def _reset() -> None:
    """Forget the build result (tests)."""
    with _LOCK:
        _STATE.clear()
