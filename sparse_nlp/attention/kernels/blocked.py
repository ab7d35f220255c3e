"""The blocked kernel: banded attention from dense operations, so it runs (and trains) under autograd.

For a window pattern plus global tokens (Longformer, StreamingLLM), queries are cut into blocks of `c`;
each block attends, in one batched SDPA call, to the keys of its band (``c + left + right`` of them) and
to the global keys; the global queries then attend to every key in a second, small call. Work and memory
grow as N * (c + left + right + globals) instead of N * N, and every operation has a backward pass.

Without attention dropout the band runs through torch's CPU flash-attention op, which also returns each
row's log-sum-exp: the band (key windows are overlapping *views* of one zero-padded copy of the keys) and the global
key columns are computed apart and merged by their log-sum-exps, and the backward pass calls the op's own
backward with the merged output and log-sum-exp (`band_autograd.BandAttention`). With dropout, and on devices other than the
CPU (the op is CPU-only), the global columns are concatenated to every window and one SDPA call does both
(`band_engines.concat_attention`).
"""

from __future__ import annotations

import functools

import torch

from ...errors import KernelUnsupported
from ...registry import ATTENTION_KERNELS
from ..patterns import BandStructure
from ..spec import MaskSpec
from .band_autograd import BandAttention
from .band_engines import FLASH_LSE as _FLASH_LSE
from .band_engines import concat_attention as _concat_attention
from .band_plan import DEFAULT_BACKWARD_BLOCK, DEFAULT_BLOCK, build_plan
from .reference import repeat_kv


def supports(spec: MaskSpec) -> BandStructure | None:
    """The band form of `spec`'s pattern when the blocked kernel can run it, else None."""
    band = spec.pattern.band()
    if band is None or not band.has_band or spec.extra is not None or not spec.is_self_attention():
        return None
    sinks = getattr(spec.pattern, "sinks", 0)
    if sinks and sinks > getattr(spec.pattern, "window", 0):
        return None  # sink rows then see fewer keys than a global row would
    return band


@ATTENTION_KERNELS.register("blocked")
@torch.compiler.disable  # eager under torch.compile: its plans and in-place native ops are not traceable
def blocked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    spec: MaskSpec,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Band + global attention in blocks; equals the reference kernel for the patterns it supports.

    Args:
        query: (B, H, N, D).
        key, value: (B, Hkv, N, D).
        spec: Mask description; its pattern must have a band form (`supports`).
        scaling: Score scale.
        dropout: Attention dropout probability.

    Returns:
        (B, H, N, D).

    Raises:
        KernelUnsupported: the pattern or call has no band form (use the reference kernel).
    """
    band = supports(spec)
    if band is None:
        raise KernelUnsupported(f"pattern {spec.pattern.name!r} has no band form for the blocked kernel")
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    n = query.shape[2]
    # The flash op is CPU-only: with dropout, without the op, or on another device (a GPU), the blocks run through
    # masked SDPA under autograd, whose backward's block size suits it
    if dropout or not _FLASH_LSE or query.device.type != "cpu":
        plan = build_plan(spec, band, n, query.device, query.dtype, DEFAULT_BACKWARD_BLOCK)
        return _concat_attention(query, key, value, plan, band, scaling, dropout)
    plan = build_plan(spec, band, n, query.device, query.dtype, DEFAULT_BLOCK)
    # the backward's plan is built on the first backward call, then cached in the spec for the other layers
    backward_plan = functools.partial(
        build_plan, spec, band, n, query.device, query.dtype, DEFAULT_BACKWARD_BLOCK
    )
    return BandAttention.apply(query, key, value, plan, backward_plan, band.left, band.right, scaling)
