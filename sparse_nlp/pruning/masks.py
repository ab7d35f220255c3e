"""Mask selection: pure functions from importance scores to boolean keep-masks.

All functions take scores shaped like the (out_features, in_features) weight (higher = more important)
and return a bool tensor of the same shape, True where the weight is kept.

Rounding rule (documented in README): a budget of sparsity ``s`` over ``n`` candidates removes exactly
``floor(s * n + 0.5)`` of them (round half up), where the candidates are the weights of a layer
(``per-layer``), of a row (``per-row``, each output neuron separately), of all selected layers together
(``global``), or the blocks of a layer (``block:RxC``). N:M keeps exactly N of every M inputs. Ties are
broken by position (``torch.topk`` on the flattened scores), so selection is deterministic.
"""

from __future__ import annotations

import math

import torch

from ..errors import MaskShapeError
from .patterns import NM, Block, Pattern, Unstructured


def num_pruned(sparsity: float, n: int) -> int:
    """How many of `n` candidates a sparsity budget removes: ``floor(s * n + 0.5)``."""
    return min(n, int(math.floor(sparsity * n + 0.5)))


def _keep_top(flat: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask of the `keep` largest entries of a 1-D tensor (ties by position)."""
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if keep > 0:
        # stable sort gives position-ordered ties, unlike topk whose tie order is unspecified
        order = torch.sort(flat, descending=True, stable=True).indices
        mask[order[:keep]] = True
    return mask


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the highest scores of the whole tensor; removes ``num_pruned(sparsity, numel)``."""
    flat = scores.detach().reshape(-1).float()
    keep = flat.numel() - num_pruned(sparsity, flat.numel())
    return _keep_top(flat, keep).view_as(scores)


def per_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Same budget in every row (output neuron): removes ``num_pruned(sparsity, in_features)`` per row."""
    s = scores.detach().float()
    rows, cols = s.shape
    keep = cols - num_pruned(sparsity, cols)
    mask = torch.zeros_like(s, dtype=torch.bool)
    if keep > 0:
        order = torch.sort(s, dim=1, descending=True, stable=True).indices  # (rows, cols)
        mask.scatter_(1, order[:, :keep], True)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the `n` highest of every `m` consecutive inputs of each row."""
    s = scores.detach().float()
    rows, cols = s.shape
    if cols % m:
        raise MaskShapeError(
            f"in_features {cols} is not a multiple of M={m}, so {n}:{m} groups do not tile the layer."
        )
    groups = s.reshape(rows, cols // m, m)  # (rows, groups, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, order[..., :n], True)
    return mask.reshape(rows, cols)


def block_mask(
    scores: torch.Tensor, sparsity: float, rows_per_block: int, cols_per_block: int
) -> torch.Tensor:
    """Keep whole blocks by their summed score; removes ``num_pruned(sparsity, number_of_blocks)`` blocks."""
    s = scores.detach().float()
    rows, cols = s.shape
    if rows % rows_per_block or cols % cols_per_block:
        raise MaskShapeError(
            f"weight of shape ({rows}, {cols}) is not tiled by {rows_per_block}x{cols_per_block} blocks."
        )
    br, bc = rows // rows_per_block, cols // cols_per_block
    block_scores = s.reshape(br, rows_per_block, bc, cols_per_block).sum(dim=(1, 3))  # (br, bc)
    keep = unstructured_mask(block_scores, sparsity)
    return keep.repeat_interleave(rows_per_block, 0).repeat_interleave(cols_per_block, 1)


def select_mask(
    scores: torch.Tensor, sparsity: float, pattern: Pattern, scope: str = "per-layer"
) -> torch.Tensor:
    """Keep-mask of one layer for a pattern and a per-layer or per-row scope.

    Args:
        scores: (out_features, in_features) importance, higher = keep.
        sparsity: Fraction removed (ignored for N:M, which fixes it).
        pattern: `Unstructured`, `NM` or `Block`.
        scope: ``per-layer`` or ``per-row`` (unstructured only; N:M and blocks are per layer by nature).
    """
    if isinstance(pattern, NM):
        return nm_mask(scores, pattern.n, pattern.m)
    if isinstance(pattern, Block):
        return block_mask(scores, sparsity, pattern.rows, pattern.cols)
    if isinstance(pattern, Unstructured):
        return per_row_mask(scores, sparsity) if scope == "per-row" else unstructured_mask(scores, sparsity)
    raise TypeError(f"unknown pattern type {type(pattern).__name__}")


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Unstructured masks with one budget over all layers together (scores must be comparable across layers)."""
    names = list(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).float() for n in names])
    keep = _keep_top(flat, flat.numel() - num_pruned(sparsity, flat.numel()))
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[start : start + size].view_as(scores[n])
        start += size
    return out
