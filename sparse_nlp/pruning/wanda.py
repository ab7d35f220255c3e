"""Wanda (Sun et al., 2023): prune by |W_ij| * ||X_j||_2, the weight times the norm of its input feature.

The input norms come from calibration data (`LayerStats.sq_norm`, the per-feature sum of squares over
calibration tokens). As in the paper, unstructured selection compares the weights of each output row
separately (``comparison="row"``, the default); ``comparison="layer"`` compares the whole layer. N:M and
block patterns use the shared selection in `sparse_nlp.pruning.masks` on the same scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..registry import PRUNING_METHODS
from .masks import per_row_mask, select_mask
from .methods import LayerStats, PruningMethod
from .patterns import Pattern, Unstructured


@dataclass
class WandaOptions:
    """Options of Wanda.

    Attributes:
        comparison: ``row`` (each output neuron keeps the same fraction, the paper's default) or ``layer``
            (one budget for the layer) for unstructured patterns with the per-layer scope.
    """

    comparison: str = "row"

    def __post_init__(self) -> None:
        if self.comparison not in ("row", "layer"):
            raise ConfigError(f"wanda option comparison must be 'row' or 'layer', got {self.comparison!r}.")


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j||_2 for an (out, in) weight and the per-input sum of squares (in,)."""
    return weight.detach().abs().float() * sq_norm.float().clamp(min=0).sqrt().unsqueeze(0)  # (out, in)


@PRUNING_METHODS.register("wanda")
class WandaPruning(PruningMethod):
    """Pruning by weights and activations: |W| times the input-feature norm, no weight update."""

    name = "wanda"
    needs_calibration = True
    Options = WandaOptions

    def score(self, weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
        if stats is None or stats.sq_norm is None:
            raise ValueError("wanda needs calibration statistics (input feature norms); none were collected.")
        return wanda_scores(weight, stats.sq_norm)

    def prune_layer(
        self, weight: torch.Tensor, sparsity: float, pattern: Pattern, scope: str, stats: LayerStats | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        scores = self.score(weight, stats)
        if isinstance(pattern, Unstructured) and scope == "per-layer" and self.options.comparison == "row":
            return per_row_mask(scores, sparsity), None
        return select_mask(scores, sparsity, pattern, scope), None
