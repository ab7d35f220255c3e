"""What counts as a prunable Linear layer, and its weight as (out_features, in_features) whatever the layer stores."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def is_prunable(module: nn.Module) -> bool:
    """Linear-like layers whose weight the pruning methods understand."""
    return isinstance(module, nn.Linear | Conv1D)


def is_transposed(module: nn.Module) -> bool:
    """Whether the layer stores its weight as (in_features, out_features) (GPT-2's Conv1D)."""
    return isinstance(module, Conv1D)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the layer stores (a view, writable in place)."""
    return module.weight.t() if is_transposed(module) else module.weight
