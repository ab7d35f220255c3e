"""The native activation-sparse linear kernel (``runtime/kernels/activation_linear.cpp``), built on first use.

`ops` compiles the source once per machine and user through `sparse_nlp.native.build_library` (later processes load
the cached library) and returns ``torch.ops.sparse_nlp_activation``, or None after one warning where it cannot be
built (no compiler, ``SPARSE_NLP_NATIVE=0``, a build error): the layers then run the dense product on the zeroed
input. The library holds AVX-512F, AVX2+FMA and portable code paths and runs the best one the CPU has;
``SPARSE_NLP_RUNTIME_ISA=portable`` (or ``avx2``, ``avx512``) caps it, e.g. for tests.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..native import NativeKernel, build_library

SOURCE = Path(__file__).resolve().parents[1] / "runtime" / "kernels" / "activation_linear.cpp"
FLAGS = ("-O3",)
ENV_ISA = "SPARSE_NLP_RUNTIME_ISA"

_KERNEL = NativeKernel(
    "sparse_nlp_activation",
    lambda: build_library("activation_linear", SOURCE, FLAGS),
    what="activation-sparse",
    fallback="layers run the dense product on the zeroed input",
    env_isa=ENV_ISA,
)
ops = _KERNEL.ops
status = _KERNEL.status
best_isa = _KERNEL.best_isa
_reset = _KERNEL.reset


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
