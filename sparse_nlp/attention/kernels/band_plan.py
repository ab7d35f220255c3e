"""The blocked kernel's plan: index and mask tensors of one (spec, length, block), built once per pass.

`build_plan` fills a `BandPlan` for a band pattern with global tokens; every layer of a forward pass reuses it
(it is cached in the spec). The engines (`band_engines`) and the autograd function (`band_autograd`) read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import KernelUnsupported
from ..patterns import BandStructure
from ..spec import MaskSpec
from .reference import revive_rows

# Query block of the forward pass and of the backward pass (when the config leaves block_size at 0). The
# forward prefers small blocks (less of each key window is masked out); the backward prefers large ones, because
# the flash op's backward returns a gradient for every key *window* (c + left + right keys per block of c), so
# small blocks multiply that buffer (timed here at 4,096 tokens, 12 heads x 64: forward 61 / 68 / 84 ms with
# blocks of 32 / 64 / 128, forward + backward 712 ms with 32 against 630 ms with 128, both under load).
DEFAULT_BLOCK = 32
DEFAULT_BACKWARD_BLOCK = 128


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


@dataclass
class BandPlan:
    """Index and mask tensors of one (spec, length, block): built once, used by every layer of a pass."""

    c: int
    nb: int
    width: int  # keys per query block: band (c + left + right) + global columns
    dtype: torch.dtype
    band_bool: torch.Tensor | None = None  # (B, nb, c, c + left + right) bool: band columns of each query
    mask: torch.Tensor | None = None  # (B*nb, 1, c, width) additive, dead rows opened (dropout path only)
    alive: torch.Tensor | bool = True
    g: int = 0
    order: torch.Tensor | None = None  # (B, g) raw indices of the global tokens
    g_valid: torch.Tensor | None = None  # (B, g)
    row_mask: torch.Tensor | None = None  # (B, 1, g, N) additive: what global queries see
    row_alive: torch.Tensor | bool = True
    band_additive: torch.Tensor | None = None  # `band_mask`, once built
    key_ok: torch.Tensor | None = None  # (B, nb, c + left + right) bool: keys each block may see
    span: int = 0  # left + right: query i of a block sees window columns i to i + span
    band_alive_rows: torch.Tensor | None = None  # `band_alive`, once built
    g_cols: torch.Tensor | None = None  # (B, 1, nb, c, g) bool: global key columns each query sees
    row_open: torch.Tensor | None = None  # (B, 1, g) global query rows with an allowed key
    native: tuple | None = None  # the native kernel's masks: band, column ranges, global columns, global rows

    @property
    def band_mask(self) -> torch.Tensor:
        """(B, 1, nb, c, c + left + right) additive, band columns only; built on first use (the native forward
        never reads it)."""
        if self.band_additive is None:
            self.band_additive = _additive(self.band_bool, self.dtype).unsqueeze(1)
        return self.band_additive

    @property
    def band_alive(self) -> torch.Tensor:
        """(B, 1, nb, c) bool: rows with an allowed band key; built on first use (the native forward never reads
        it)."""
        if self.band_alive_rows is None:
            self.band_alive_rows = self.band_bool.any(dim=-1).unsqueeze(1)
        return self.band_alive_rows


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask -> additive float mask (0 where allowed, -inf elsewhere)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def build_plan(
    spec: MaskSpec,
    band: BandStructure,
    n: int,
    device: torch.device,
    dtype: torch.dtype,
    default_block: int = DEFAULT_BLOCK,
) -> BandPlan:
    key = ("blocked", n, spec.block_size or default_block, str(device), dtype)
    if key in spec.cache:
        return spec.cache[key]
    bsz, left, right = spec.batch, band.left, band.right
    c = max(1, min(spec.block_size or default_block, n))
    nb = -(-n // c)
    n_pad = nb * c
    width = c + left + right
    flags = _global_flags(band, spec, n, device)
    real = (
        spec.padding.to(device)
        if spec.padding is not None
        else torch.ones(bsz, n, dtype=torch.bool, device=device)
    )
    key_ok = real if flags is None else real & ~flags  # global keys join through their own columns
    key_ok = F.pad(key_ok, (left, n_pad - n + right), value=False).unfold(1, width, c)  # (B, nb, W)
    i = torch.arange(c, device=device).view(c, 1)
    j = torch.arange(width, device=device).view(1, width)
    in_band = (j - i >= 0) & (j - i <= left + right)  # (c, W): key raw = block*c + j - left
    mask = in_band.view(1, 1, c, width) & key_ok.unsqueeze(2)  # (B, nb, c, W)
    plan = BandPlan(c=c, nb=nb, width=width, dtype=dtype, key_ok=key_ok, span=left + right)
    if flags is not None:
        count = flags.sum(dim=1)  # (B,)
        g = int(count.max())
        order = torch.argsort((~flags).to(torch.int8), dim=1, stable=True)[:, :g]  # global raw indices first
        g_valid = torch.arange(g, device=device).view(1, g) < count.view(-1, 1)  # (B, g)
        g_mask = (g_valid & real.gather(1, order)).view(bsz, 1, 1, g).expand(bsz, nb, c, g)
        if band.causal:
            q_raw = torch.arange(n_pad, device=device).view(1, nb, c, 1)
            g_mask = g_mask & (order.view(bsz, 1, 1, g) <= q_raw)
        plan.g_cols = g_mask.unsqueeze(1)
        row_mask = g_valid.view(bsz, 1, g, 1) & real.view(bsz, 1, 1, n)
        if band.causal:
            row_mask = row_mask & (
                torch.arange(n, device=device).view(1, 1, 1, n) <= order.view(bsz, 1, g, 1)
            )
        plan.row_open = row_mask.any(dim=-1)  # (B, 1, g)
        row_mask, plan.row_alive = revive_rows(row_mask)
        plan.row_mask = _additive(row_mask, dtype)
        plan.g, plan.order, plan.g_valid = g, order, g_valid
        plan.width = width + g
    plan.band_bool = mask
    spec.cache[key] = plan
    return plan


def concat_mask(plan: BandPlan) -> None:
    """Build the dropout path's additive mask over band + global columns, once per plan (lazily: the flash
    path never needs it)."""
    if plan.mask is not None:
        return
    mask = plan.band_bool  # (B, nb, c, band width), then the global key columns
    if plan.g:
        mask = torch.cat([mask, plan.g_cols.squeeze(1)], dim=3)
    mask = mask.reshape(mask.shape[0] * plan.nb, 1, plan.c, plan.width)
    mask, plan.alive = revive_rows(mask)
    plan.mask = _additive(mask, plan.dtype)  # SDPA would convert a bool mask on every call (every layer)
