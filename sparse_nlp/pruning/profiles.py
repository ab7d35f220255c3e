"""Per-layer sparsity profiles: uniform, and OWL outlier-weighted non-uniform at the same total.

OWL (Yin et al., 2024, "Outlier Weighed Layerwise sparsity"): blocks whose Wanda scores hold more outliers
(entries above ``m`` times the block's mean score) matter more and are pruned less. The outlier ratios of
the blocks are rescaled to the range [0, 2 * lam], centred, and subtracted from the target, so block
sparsities span ``target +- lam`` and their parameter-weighted mean is the target (the total is kept).

The maths are pure functions (`outlier_ratio`, `owl_profile`); `owl_sparsities` gathers the ratios with a
dense calibration walk over the blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..targets import layer_index, linear_weight
from .methods import LayerStats
from .wanda import wanda_scores

OWL_M = 5.0
"""Outlier threshold: a score above OWL_M times the block mean is an outlier (the paper's M)."""
OWL_LAMBDA = 0.08
"""Half-width of the sparsity range around the target (the paper's lambda)."""


def uniform_profile(num_layers: int, sparsity: float) -> list[float]:
    """Every layer at the target sparsity."""
    return [float(sparsity)] * num_layers


def outlier_ratio(scores: list[torch.Tensor], m: float = OWL_M) -> float:
    """Fraction of the entries of a block's score tensors (taken together) above `m` times their mean."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


def owl_profile(
    ratios: list[float], sizes: list[int], sparsity: float, lam: float = OWL_LAMBDA
) -> list[float]:
    """Block sparsities from outlier ratios: more outliers -> less sparse; weighted mean equals `sparsity`.

    Args:
        ratios: Outlier ratio of each block.
        sizes: Number of prunable weights of each block (the weights of the mean).
        sparsity: Target total sparsity.
        lam: Sparsities span about ``sparsity +- lam``.

    Returns:
        One sparsity per block, clipped to [0, 0.99].
    """
    r = torch.tensor(ratios, dtype=torch.float64)
    w = torch.tensor(sizes, dtype=torch.float64)
    spread = r.max() - r.min()
    if len(ratios) < 2 or spread <= 0:
        return uniform_profile(len(ratios), sparsity)
    delta = (r - r.min()) / spread * (2 * lam)  # (L,) in [0, 2 lam]
    delta = delta - (delta * w).sum() / w.sum()
    out = (sparsity - delta).clamp(0.0, 0.99)
    return [float(x) for x in out]


def owl_sparsities(
    model: nn.Module, plans: list, walk: Callable, *, m: float = OWL_M, lam: float = OWL_LAMBDA
) -> dict[str, float]:
    """Per-layer sparsities of the OWL `plans` (each rule separately), from one dense walk over the blocks.

    Args:
        model: The model being pruned.
        plans: Layer plans with ``rule.profile == "owl"``.
        walk: ``walk(per_block, desc)`` runs the calibration batches block by block (see
            `sparse_nlp.pruning.calibration`), calling ``per_block(i, collect)``.
        m: Outlier threshold.
        lam: Sparsity half-range.

    Returns:
        Layer name -> sparsity. Layers outside the repeated blocks keep their rule's sparsity.
    """
    by_rule: dict[int, list] = {}
    for plan in plans:
        by_rule.setdefault(id(plan.rule), []).append(plan)
    # rule id -> block index -> (outlier ratio, size)
    ratios: dict[int, dict[int, tuple[float, int]]] = {key: {} for key in by_rule}

    def per_block(i: int, collect: Callable) -> None:
        here = [p for p in plans if layer_index(model, p.name) == i]
        if not here:
            return
        stats: dict[str, LayerStats] = collect({p.name: p.module for p in here}, set())
        for key, group in by_rule.items():
            mine = [p for p in group if p.name in stats]
            if mine:
                scores = [wanda_scores(linear_weight(p.module), stats[p.name].sq_norm) for p in mine]
                ratios[key][i] = (outlier_ratio(scores, m), sum(s.numel() for s in scores))

    walk(per_block, "OWL outlier ratios")
    out: dict[str, float] = {}
    for key, group in by_rule.items():
        blocks = sorted(ratios[key])
        profile = owl_profile(
            [ratios[key][b][0] for b in blocks], [ratios[key][b][1] for b in blocks], group[0].sparsity, lam
        )
        block_sparsity = dict(zip(blocks, profile))
        for p in group:
            out[p.name] = block_sparsity.get(layer_index(model, p.name), p.sparsity)
    return out
