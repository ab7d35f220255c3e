"""Movement pruning (Sanh, Wolf & Rush, 2020): keep the weights that move away from zero while fine-tuning.

Each pruned layer gets a learnable score tensor ``S`` (shape of the (out, in) weight). The forward pass uses
``W * M(S)``; with the straight-through estimator the gradient of the loss with respect to ``S`` is
``dL/dW' * W`` (``W'`` the masked weight), so a score grows when the weight moves away from zero.

Two variants:

- ``hard`` (top-k): ``M`` keeps the highest scores at the sparsity of the schedule, in the rule's pattern
  and scope (unstructured, N:M, blocks; per-layer, per-row or global);
- ``soft`` (thresholded): ``M = sigmoid(S) > threshold``; the sparsity is whatever the scores reach, pushed
  up by the optional L1 penalty ``l1 * sum(sigmoid(S))``.

This module holds the pure tensor maths and the method's registration; the training-time lifecycle (score
tensors, gradient hooks, the scores' optimizer) is `sparse_nlp.training.pruner.GradualPruner`. Movement is a
training-time method: one-shot `sparse_nlp.sparsify` refuses it with a message saying where to use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..registry import PRUNING_METHODS
from .methods import LayerStats, PruningMethod

VARIANTS = ("hard", "soft")
INITS = ("magnitude", "constant")


@dataclass
class MovementOptions:
    """Options of movement pruning.

    Attributes:
        variant: ``hard`` (top-k at the scheduled sparsity) or ``soft`` (``sigmoid(S) > threshold``).
        score_lr: Learning rate of the scores' own Adam optimizer. Adam moves each score by about this much per
            step whatever the gradient's size, so it sets how far scores drift from their start. From a
            pretrained model (as in the paper) 1e-2 is usual; from an already fine-tuned model that is also its
            own teacher the signal is mostly batch noise, and 1e-2 collapsed MiniLM on SST-2
            (``docs/results/training-aware.md``): use 1e-4 to 1e-3 there.
        threshold: Soft variant: keep where ``sigmoid(S) > threshold``.
        l1: Weight of the L1 penalty on ``sigmoid(S)`` (0 turns it off); drives the soft variant's sparsity.
        init: Initial scores: ``magnitude`` (``|W|`` over its layer mean, so training starts from magnitude
            order) or ``constant`` (all ``init_value``; ties broken by position).
        init_value: Constant initial score (``init="constant"``), and an offset added to magnitude scores.
    """

    variant: str = "hard"
    score_lr: float = 1e-2
    threshold: float = 0.5
    l1: float = 0.0
    init: str = "magnitude"
    init_value: float = 0.0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(
                f"movement option variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}."
            )
        if self.init not in INITS:
            raise ConfigError(f"movement option init must be one of {', '.join(INITS)}, got {self.init!r}.")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"movement option threshold must be in (0, 1), got {self.threshold!r}.")
        if self.l1 < 0 or self.score_lr <= 0:
            raise ConfigError(
                f"movement options need l1 >= 0 and score_lr > 0, got l1={self.l1!r}, score_lr={self.score_lr!r}."
            )


def initial_scores(weight: torch.Tensor, options: MovementOptions) -> torch.Tensor:
    """Initial (out, in) scores of a weight."""
    w = weight.detach().float()
    if options.init == "constant":
        return torch.full_like(w, options.init_value)
    return w.abs() / w.abs().mean().clamp(min=1e-12) + options.init_value


def score_gradient(grad_masked_weight: torch.Tensor, full_weight: torch.Tensor) -> torch.Tensor:
    """Straight-through gradient of the scores: ``dL/dS = dL/dW' * W`` (all (out, in))."""
    return grad_masked_weight.float() * full_weight.float()


def l1_gradient(scores: torch.Tensor, l1: float) -> torch.Tensor:
    """Gradient of ``l1 * sum(sigmoid(S))`` with respect to ``S``."""
    sig = torch.sigmoid(scores)
    return l1 * sig * (1 - sig)


def soft_mask(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Soft-movement keep-mask: ``sigmoid(S) > threshold``."""
    return torch.sigmoid(scores.detach()) > threshold


@PRUNING_METHODS.register("movement")
class MovementPruning(PruningMethod):
    """Movement pruning: scores learned during fine-tuning (see module docstring). Training-time only."""

    name = "movement"
    Options = MovementOptions

    def score(self, weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
        raise ConfigError(
            "pruning method 'movement' learns its scores during training; use it with "
            "sparse_nlp.training.GradualPruner (Trainer callback or accelerate loop), not one-shot sparsify."
        )
