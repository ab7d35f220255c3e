"""Attention kernels for a `MaskSpec`, registered in `sparse_nlp.registry.ATTENTION_KERNELS`, and `auto` choice.

- ``reference``: SDPA with the dense boolean mask; exact for every pattern, no speed-up.
- ``blocked``: band + global tokens from dense batched operations; fast, linear memory, trains.
- ``flex``: compiled flex_attention with a cached BlockMask; any pattern, inference only.
- ``auto``: blocked when the pattern has a band form, else flex for long inference inputs, else reference.
"""

from __future__ import annotations

import logging

import torch

from ...config import AUTO_KERNEL
from ...registry import ATTENTION_KERNELS
from ..spec import MaskSpec
from . import blocked, flex, reference  # noqa: F401  (each registers its kernel)

logger = logging.getLogger(__name__)

AUTO_MIN_LENGTH = 256
"""Below this many queries `auto` uses the reference kernel (the mask is small and one call is cheapest)."""
FLEX_MIN_LENGTH = 1024


_warned_extra = False


def _warn_extra_mask_once(spec: MaskSpec) -> None:
    """Say once per process that the model's own mask keeps the band kernels out (a silent slow-down otherwise)."""
    global _warned_extra
    if _warned_extra:
        return
    _warned_extra = True
    logger.warning(
        "attention pattern %r: the model's own attention mask (e.g. a sliding_window in its config narrower than "
        "the pattern, or packed sequences) removes pairs the pattern allows, so the blocked kernel cannot run and "
        "the reference kernel does (correct, but no faster than dense attention). A pattern inside the model's "
        "window, or the model's window removed (config.sliding_window = None), lets it run.",
        spec.pattern.name,
    )


def choose_kernel(spec: MaskSpec, needs_grad: bool, dropout: float = 0.0) -> str:
    """The kernel that runs `spec`: the requested one when it can, else the best that can."""
    name = spec.kernel
    can_block = blocked.supports(spec) is not None
    if (
        not can_block
        and spec.extra is not None
        and (name == "blocked" or (name == AUTO_KERNEL and spec.q_length >= AUTO_MIN_LENGTH))
        and spec.pattern.band() is not None
        and spec.is_self_attention()
    ):
        _warn_extra_mask_once(spec)
    can_flex = flex.supports(spec, needs_grad, dropout)
    if name == "blocked":
        return "blocked" if can_block else "reference"
    if name == "flex":
        if can_flex:
            return "flex"
        return "blocked" if can_block else "reference"
    if name != AUTO_KERNEL:  # reference, or another registered kernel: runs as asked
        return name
    if spec.q_length < AUTO_MIN_LENGTH:
        return "reference"
    if can_block:
        return "blocked"
    if can_flex and spec.q_length >= FLEX_MIN_LENGTH:
        return "flex"
    return "reference"


def run_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    spec: MaskSpec,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention under `spec` with the kernel `choose_kernel` picks. Shapes as `reference_attention`."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    name = choose_kernel(spec, needs_grad, dropout)
    return ATTENTION_KERNELS.get(name)(query, key, value, spec, scaling, dropout)


__all__ = ["choose_kernel", "run_kernel"]
