"""The reference kernel: SDPA with the full boolean mask. Exact for every pattern; no faster than dense.

`softcapped_attention` is its form for models that soft-cap the attention logits (Gemma 2's
``attn_logit_softcapping``): scores are computed explicitly, capped as ``cap * tanh(s / cap)`` before the mask,
as transformers' eager attention does, since SDPA has no soft-capping.
"""

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


def softcapped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    spec: MaskSpec,
    scaling: float,
    softcap: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention under `spec` with soft-capped logits ``softcap * tanh(q k^T * scaling / softcap)``.

    Args:
        query: (B, H, Lq, D).
        key, value: (B, Hkv, Lk, D), Hkv dividing H.
        spec: The mask description (its dense mask is built: exact, no faster than dense attention).
        scaling: Score scale.
        softcap: The cap (> 0).
        dropout: Attention dropout probability.

    Returns:
        (B, H, Lq, D); a query without any allowed key gives 0.
    """
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    mask, alive = revive_rows(spec.dense().to(query.device))  # (B, 1, Lq, Lk)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, Lq, Lk)
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    out = torch.matmul(probs, value)  # (B, H, Lq, D)
    return out if alive is True else out * alive.to(out.dtype)
