"""The native activation-sparse linear kernels (``runtime/kernels/activation_linear.cpp``), built on first use.

`activation_linear` reads a dense transposed weight; `masked_activation_linear` reads one compressed by
`compress` (a pruned weight: only its kept entries, with a bitmask per 64 outputs), so activation and weight
sparsity compose; `expert_rows` computes the rows of MoEfication's kept experts only.

`ops` compiles the source once per machine and user through `sparse_nlp.native.build_library` (later processes load
the cached library) and returns ``torch.ops.sparse_nlp_activation``, or None after one warning where it cannot be
built (no compiler, ``SPARSE_NLP_NATIVE=0``, a build error): the layers then run the dense product on the zeroed
input. The library holds AVX-512F, AVX2+FMA and portable code paths and runs the best one the CPU has;
``SPARSE_NLP_RUNTIME_ISA=portable`` (or ``avx2``, ``avx512``) caps it, e.g. for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..native import NativeKernel, build_library
from ..runtime.autotune import time_methods

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


CHUNK = 64
"""Outputs per bitmask word of a compressed transposed weight."""
PAD = 8
"""Zeros after the kept weights of a compressed weight: a vector load of 8 may read past the last kept one."""


@dataclass
class CompressedRows:
    """A transposed weight (in, out) keeping its nonzero entries: for each input row and each chunk of 64 outputs,
    ``bits`` (in, chunks) int64 has bit k set where output ``64 * chunk + k`` is kept, ``offsets`` (in, chunks)
    int32 is the index in ``vals`` of that chunk's first kept weight, and ``vals`` holds the kept weights row by
    row, then `PAD` zeros."""

    bits: torch.Tensor
    offsets: torch.Tensor
    vals: torch.Tensor
    out_features: int

    @property
    def density(self) -> float:
        return (self.vals.numel() - PAD) / max(1, self.bits.shape[0] * self.out_features)

    def to_dense(self) -> torch.Tensor:
        """The (in, out) transposed weight back (zeros where nothing is kept)."""
        in_f, chunks = self.bits.shape
        shifts = torch.arange(CHUNK, dtype=torch.int64)
        mask = ((self.bits.unsqueeze(-1) >> shifts) & 1).bool().reshape(in_f, chunks * CHUNK)
        dense = torch.zeros(in_f, chunks * CHUNK)
        dense[mask] = self.vals[: int(mask.sum())]
        return dense[:, : self.out_features]


def compress(weight_t: torch.Tensor) -> CompressedRows:
    """Compress a transposed weight (in, out) to its nonzero entries (see `CompressedRows`)."""
    in_f, out_f = weight_t.shape
    chunks = -(-out_f // CHUNK)
    padded = torch.zeros(in_f, chunks * CHUNK, dtype=torch.float32)
    padded[:, :out_f] = weight_t
    keep = padded != 0
    if int(keep.sum()) >= 2**31:
        raise ValueError(f"a weight of {in_f} x {out_f} keeps too many entries for int32 offsets")
    grouped = keep.reshape(in_f, chunks, CHUNK)
    shifts = torch.arange(CHUNK, dtype=torch.int64)
    bits = (grouped.to(torch.int64) << shifts).sum(-1)  # distinct bits: the sum is an OR
    counts = grouped.sum(-1).reshape(-1)
    offsets = torch.zeros_like(counts)
    offsets[1:] = torch.cumsum(counts, 0)[:-1]
    vals = torch.cat([padded[keep], torch.zeros(PAD)])
    return CompressedRows(bits.contiguous(), offsets.reshape(in_f, chunks).to(torch.int32), vals, int(out_f))


def masked_activation_linear(
    x: torch.Tensor, weight: CompressedRows, bias: torch.Tensor | None, threshold: float
) -> torch.Tensor:
    """(T, in) x and a compressed transposed weight -> (T, out): the product with ``|x| <= threshold`` zeroed,
    reading only the kept weights of the kept inputs. Runs the native kernel when it is built; otherwise torch
    on the decompressed weight."""
    op = ops()
    if op is None:
        kept = torch.where(x.abs() > threshold, x, torch.zeros((), dtype=x.dtype))
        out = kept @ weight.to_dense()
        return out if bias is None else out + bias
    return op.masked_activation_linear(
        x, weight.bits, weight.offsets, weight.vals, bias, weight.out_features, float(threshold), best_isa()
    )


def compressed_is_faster(weight_t: torch.Tensor, packed: CompressedRows, rounds: int = 3) -> bool:
    """Whether the compressed product of `packed` beats the dense transposed one of `weight_t` (contiguous) on this
    CPU, timed side by side by the runtime's autotune timer on one token with every input kept (both costs grow
    with the kept inputs alike). False when the native kernel is not built (the fallback decompresses on every
    call)."""
    op = ops()
    if op is None:
        return False
    isa = best_isa()
    runners = {
        "dense": lambda x: op.activation_linear(x, weight_t, None, -1.0, isa),
        "compressed": lambda x: op.masked_activation_linear(
            x, packed.bits, packed.offsets, packed.vals, None, packed.out_features, -1.0, isa
        ),
    }
    x = torch.randn(1, weight_t.shape[0], generator=torch.Generator().manual_seed(0))
    seconds = time_methods(runners, x, rounds=rounds)
    return seconds["compressed"] < seconds["dense"]


def expert_rows(
    x: torch.Tensor,
    weight: torch.Tensor,
    chosen: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    out_features: int,
) -> torch.Tensor:
    """One token x (in,), a weight grouped by expert (E, S, in), the kept experts (k,) int64 and the output of each
    grouped row (E, S) int64 (``out_features`` or more: a padding row) -> (out_features,): the kept experts' rows
    times x (plus their (E, S) bias) at their outputs, zeros elsewhere. Runs the native kernel when it is built;
    otherwise one torch product per kept expert."""
    op = ops()
    if op is None:
        col = x.reshape(-1, 1)
        y = torch.cat([torch.mm(weight[e], col).reshape(-1) for e in chosen.tolist()])
        if bias is not None:
            y = y + bias.index_select(0, chosen).reshape(-1)
        out = x.new_zeros(out_features + 1)  # the last slot takes the padding rows
        out.index_copy_(0, rows.index_select(0, chosen).reshape(-1).clamp(max=out_features), y)
        return out[:out_features]
    return op.expert_rows(x, weight, chosen, bias, rows, out_features, best_isa())
