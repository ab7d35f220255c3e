"""The blocked kernel: banded attention from dense operations, so it runs (and trains) under autograd.

For a window pattern plus global tokens (Longformer, StreamingLLM), queries are cut into blocks of `c`;
each block attends, in one batched SDPA call, to the keys of its band (``c + left + right`` of them) and
to the global keys; the global queries then attend to every key in a second, small call. Work and memory
grow as N * (c + left + right + globals) instead of N * N, and every operation has a backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...registry import ATTENTION_KERNELS
from ..patterns import BandStructure
from ..spec import MaskSpec
from .reference import masked_sdpa, repeat_kv

DEFAULT_BLOCK = 128


class KernelUnsupported(ValueError):
    """The blocked kernel cannot run this pattern or call (the caller falls back to the reference)."""


def supports(spec: MaskSpec) -> BandStructure | None:
    """The band form of `spec`'s pattern when the blocked kernel can run it, else None."""
    band = spec.pattern.band()
    if band is None or band.left < 0 or spec.extra is not None or not spec.is_self_attention():
        return None
    sinks = getattr(spec.pattern, "sinks", 0)
    if sinks and sinks > getattr(spec.pattern, "window", 0):
        return None  # sink rows then see fewer keys than a global row would
    return band


def _global_flags(band: BandStructure, spec: MaskSpec, n: int, device: torch.device) -> torch.Tensor | None:
    """(B, N) bool: raw indices that are global in each row, or None when the pattern has no globals."""
    if not band.positions and not band.token_ids:
        return None
    flags = torch.zeros(spec.batch, n, dtype=torch.bool, device=device)
    shift = spec.shift if spec.shift is not None else torch.zeros(spec.batch, dtype=torch.long, device=device)
    rows = torch.arange(spec.batch, device=device)
    for p in band.positions:
        raw = shift + p  # (B,)
        ok = raw < n
        flags[rows[ok], raw[ok]] = True
    if band.token_ids:
        if spec.token_flags is None:
            raise KernelUnsupported("global token ids need the input ids")
        flags |= spec.token_flags[:, :n].to(device)
    return flags


@ATTENTION_KERNELS.register("blocked")
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
    bsz, heads, n, dim = query.shape
    device = query.device
    left, right = band.left, band.right
    c = spec.block_size or DEFAULT_BLOCK
    c = max(1, min(c, n))
    nb = -(-n // c)
    n_pad = nb * c
    width = c + left + right

    flags = _global_flags(band, spec, n, device)
    real = (
        spec.padding.to(device)
        if spec.padding is not None
        else torch.ones(bsz, n, dtype=torch.bool, device=device)
    )

    # ---- band part: block b of queries sees raw keys [b*c - left, b*c + c + right) ------------------------
    q_blocks = F.pad(query, (0, 0, 0, n_pad - n)).view(bsz, heads, nb, c, dim)
    q_blocks = q_blocks.permute(0, 2, 1, 3, 4).reshape(bsz * nb, heads, c, dim)  # (B*nb, H, c, D)
    k_pad = F.pad(key, (0, 0, left, n_pad - n + right))  # (B, H, left + Np + right, D)
    v_pad = F.pad(value, (0, 0, left, n_pad - n + right))
    k_win = k_pad.unfold(2, width, c).permute(0, 2, 1, 4, 3)  # (B, nb, H, W, D)
    v_win = v_pad.unfold(2, width, c).permute(0, 2, 1, 4, 3)
    key_ok = real if flags is None else real & ~flags  # global keys join through their own columns
    key_ok = F.pad(key_ok, (left, n_pad - n + right), value=False).unfold(1, width, c)  # (B, nb, W)
    i = torch.arange(c, device=device).view(c, 1)
    j = torch.arange(width, device=device).view(1, width)
    in_band = (j - i >= 0) & (j - i <= left + right)  # (c, W): key raw = block*c + j - left
    mask = in_band.view(1, 1, c, width) & key_ok.unsqueeze(2)  # (B, nb, c, W)

    if flags is not None:
        count = flags.sum(dim=1)  # (B,)
        g = int(count.max())
        order = torch.argsort((~flags).to(torch.int8), dim=1, stable=True)[:, :g]  # global raw indices first
        g_valid = torch.arange(g, device=device).view(1, g) < count.view(-1, 1)  # (B, g)
        g_key_ok = g_valid & real.gather(1, order)
        idx = order.view(bsz, 1, g, 1).expand(bsz, heads, g, dim)
        k_g, v_g = key.gather(2, idx), value.gather(2, idx)  # (B, H, g, D)
        k_g_rep = k_g.unsqueeze(1).expand(bsz, nb, heads, g, dim)
        v_g_rep = v_g.unsqueeze(1).expand(bsz, nb, heads, g, dim)
        k_win = torch.cat([k_win, k_g_rep], dim=3)
        v_win = torch.cat([v_win, v_g_rep], dim=3)
        g_mask = g_key_ok.view(bsz, 1, 1, g).expand(bsz, nb, c, g)
        if band.causal:
            q_raw = torch.arange(n_pad, device=device).view(1, nb, c, 1)
            g_mask = g_mask & (order.view(bsz, 1, 1, g) <= q_raw)
        mask = torch.cat([mask.expand(bsz, nb, c, width), g_mask], dim=3)
        width = width + g
    k_win = k_win.reshape(bsz * nb, heads, width, dim)
    v_win = v_win.reshape(bsz * nb, heads, width, dim)
    mask = mask.expand(bsz, nb, c, width).reshape(bsz * nb, 1, c, width)
    out = masked_sdpa(q_blocks, k_win, v_win, mask, scaling, dropout)  # (B*nb, H, c, D)
    out = out.view(bsz, nb, heads, c, dim).permute(0, 2, 1, 3, 4).reshape(bsz, heads, n_pad, dim)[:, :, :n]

    # ---- global queries attend to every (allowed) key ----------------------------------------------------
    if flags is not None and g > 0:
        q_g = query.gather(2, idx)  # (B, H, g, D)
        row_mask = g_valid.view(bsz, 1, g, 1) & real.view(bsz, 1, 1, n)
        if band.causal:
            row_mask = row_mask & (
                torch.arange(n, device=device).view(1, 1, 1, n) <= order.view(bsz, 1, g, 1)
            )
        out_g = masked_sdpa(q_g, key, value, row_mask, scaling, dropout)  # (B, H, g, D)
        keep = out.gather(2, idx)
        out_g = torch.where(g_valid.view(bsz, 1, g, 1), out_g, keep)
        out = out.scatter(2, idx, out_g)
    return out
