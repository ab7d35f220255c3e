"""The reference kernel: SDPA with the full boolean mask. Exact for every pattern; no faster than dense."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...registry import ATTENTION_KERNELS
from ..spec import MaskSpec


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, N, D) -> (B, Hkv * groups, N, D) for grouped-query attention."""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def masked_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    dropout: float,
    alive: torch.Tensor | bool | None = None,
) -> torch.Tensor:
    """SDPA under a bool mask where rows with no allowed key give 0 (not NaN).

    Args:
        query: (B, H, Lq, D); key, value: (B, H, Lk, D) (heads already repeated for GQA).
        mask: bool, broadcastable to (B, H, Lq, Lk).
        scaling: Score scale.
        dropout: Attention dropout probability (training only).
        alive: What `revive_rows` returned for `mask` (then `mask` must be its revived mask), or None.
    """
    mask, alive = revive_rows(mask) if alive is None else (mask, alive)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out if alive is True else out * alive.to(out.dtype)


def revive_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | bool]:
    """(mask with dead rows opened, alive (.., Lq, 1) or True): SDPA gives NaN on rows without any allowed key."""
    alive = mask.any(dim=-1, keepdim=True)
    if bool(alive.all()):
        return mask, True
    return mask | ~alive, alive


@ATTENTION_KERNELS.register("reference")
def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    spec: MaskSpec,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention under `spec` through one SDPA call with the dense (B, 1, Lq, Lk) mask.

    Args:
        query: (B, H, Lq, D).
        key, value: (B, Hkv, Lk, D), Hkv dividing H.
        spec: The mask description.
        scaling: Score scale (1/sqrt(D) usually).
        dropout: Attention dropout probability.

    Returns:
        (B, H, Lq, D).
    """
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    return masked_sdpa(query, key, value, spec.dense().to(query.device), scaling, dropout)
