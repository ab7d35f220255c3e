"""The weight-pruning method interface and its registry.

A method turns one layer's weight (and, for calibrated methods, statistics of its inputs) into importance
scores; mask selection by pattern and scope is shared (`sparse_nlp.pruning.masks`). Methods that also
change the kept weights (SparseGPT) override `prune_layer`. Adding a method = one module with a subclass
registered under a name, plus a row in the test matrix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import ConfigError
from ..registry import PRUNING_METHODS, suggest
from .masks import select_mask
from .patterns import Pattern


@dataclass
class NoOptions:
    """Options of a method that has none."""


@dataclass
class LayerStats:
    """Calibration statistics of one layer's inputs, gathered by the calibration pass.

    Attributes:
        sq_norm: Sum over calibration tokens of x_j^2 for every input feature j, shape (in_features,).
        hessian: Sum of x x^T, shape (in_features, in_features), for methods that ask for it.
        count: Number of tokens seen.
        cross: Sum of x_dense x^T, shape (in_features, in_features): the same tokens' inputs in the dense model
            against those in the partly pruned model, for methods that reconstruct the dense outputs.
    """

    sq_norm: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    count: int = 0
    cross: torch.Tensor | None = None


class PruningMethod:
    """Base class of weight-pruning methods.

    Subclasses set `name`, `needs_calibration`, optionally `needs_hessian`, `needs_dense_inputs` and an
    `Options` dataclass, and implement `score`. These class attributes are the method's capabilities: the
    calibration pass reads them to decide what to collect.
    """

    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    needs_hessian: ClassVar[bool] = False
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        options = dict(options or {})
        known = [f.name for f in dataclasses.fields(self.Options)]
        for key in options:
            if key not in known:
                raise ConfigError(
                    f"unknown option {key!r} for pruning method {self.name!r}.{suggest(key, known)} "
                    f"Known options: {', '.join(known) or 'none'}."
                )
        self.options = self.Options(**options)

    @property
    def needs_dense_inputs(self) -> bool:
        """Whether the calibration pass must also gather the dense model's inputs (``LayerStats.cross``)."""
        return False

    def score(self, weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
        """Importance of each entry of the (out, in) weight; higher is kept."""
        raise NotImplementedError

    def prune_layer(
        self, weight: torch.Tensor, sparsity: float, pattern: Pattern, scope: str, stats: LayerStats | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Keep-mask of one (out, in) weight, and a replacement weight or None when the kept values stay."""
        return select_mask(self.score(weight, stats), sparsity, pattern, scope), None


def get_method(name: str, options: dict[str, Any] | None = None) -> PruningMethod:
    """Instantiate a registered pruning method by name (the registry imports the built-in ones on first use)."""
    return PRUNING_METHODS.get(name)(options)


@PRUNING_METHODS.register("magnitude")
class MagnitudePruning(PruningMethod):
    """Remove the weights of smallest absolute value (no calibration data)."""

    name = "magnitude"

    def score(self, weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
        return weight.detach().abs()
