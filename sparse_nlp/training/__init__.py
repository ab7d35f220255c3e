"""Training-aware sparsity: gradual magnitude / movement pruning, distillation, Trainer callback, accelerate loop."""

from .accelerate_loop import LoopConfig, train_loop
from .callback import SparsityCallback
from .distillation import DistillationConfig, Distiller, distillation_loss
from .pruner import GradualPruner

__all__ = [
    "DistillationConfig",
    "Distiller",
    "GradualPruner",
    "LoopConfig",
    "SparsityCallback",
    "distillation_loss",
    "train_loop",
]
