"""Training-aware sparsity: gradual magnitude / movement pruning, gradual structured removal, distillation,
Trainer callbacks, accelerate loop."""

from .accelerate_loop import LoopConfig, train_loop
from .callback import SparsityCallback, StructuredCallback
from .distillation import DistillationConfig, Distiller, distillation_loss
from .pruner import GradualPruner
from .structured import StructuredPruner, StructuredSchedule

__all__ = [
    "DistillationConfig",
    "Distiller",
    "GradualPruner",
    "LoopConfig",
    "SparsityCallback",
    "StructuredCallback",
    "StructuredPruner",
    "StructuredSchedule",
    "distillation_loss",
    "train_loop",
]
