"""sparse_nlp: make Hugging Face transformer models sparse and keep them sparse.

Public API::

    import sparse_nlp
    config = sparse_nlp.SparsityConfig.magnitude(0.5, targets="ffn")
    sparse_nlp.sparsify(model, config)
    print(sparse_nlp.report(model))
    sparse_nlp.save_pretrained(model, "out/")
    model = sparse_nlp.from_pretrained("out/")
"""

from . import attention  # noqa: F401  (registers the "sparse_nlp" attention implementation with transformers)
from .attention.apply import apply_attention, remove_attention
from .attention.cache import SinkWindowCache
from .attention.long_context import extend_positions
from .attention.patterns import AttentionPatternError, build_pattern
from .checkpoint import (
    CheckpointError,
    compact_checkpoint,
    from_pretrained,
    save_pretrained,
    verify_checkpoint,
)
from .compact import CompactFormatError
from .config import (
    FORMAT_VERSION,
    ActivationSparsity,
    AttentionSparsity,
    ConfigError,
    SparsityConfig,
    StructuredSparsity,
    WeightSparsity,
)
from .errors import SparseNLPError
from .evaluation.metrics import load_metric
from .evaluation.speed import compare_speed
from .evaluation.tasks import evaluate_glue
from .hub import HubError, push_to_hub, render_model_card
from .metadata import MetadataError
from .pruning.masking import apply_masks
from .pruning.patterns import NM, Block, PatternError, Unstructured, parse_pattern
from .pruning.schedules import CubicSchedule
from .recipes import load_recipe, run_recipe
from .registry import RegistryError
from .report import SparsityReport, report
from .sparsify import sparsify, to_dense
from .structured import apply_structured
from .structured.removal import StructuredError, remove_units
from .structured.scores import MovementTracker
from .targets import TargetError, UnsupportedModelError
from .training import DistillationConfig, Distiller, GradualPruner, LoopConfig, SparsityCallback, train_loop
from .version import __version__

__all__ = [
    "ActivationSparsity",
    "AttentionPatternError",
    "AttentionSparsity",
    "Block",
    "CheckpointError",
    "CompactFormatError",
    "ConfigError",
    "CubicSchedule",
    "DistillationConfig",
    "Distiller",
    "FORMAT_VERSION",
    "GradualPruner",
    "HubError",
    "LoopConfig",
    "MetadataError",
    "MovementTracker",
    "NM",
    "PatternError",
    "RegistryError",
    "SinkWindowCache",
    "SparsityCallback",
    "SparsityConfig",
    "SparseNLPError",
    "SparsityReport",
    "StructuredError",
    "StructuredSparsity",
    "TargetError",
    "Unstructured",
    "UnsupportedModelError",
    "WeightSparsity",
    "__version__",
    "apply_attention",
    "apply_masks",
    "apply_structured",
    "build_pattern",
    "compact_checkpoint",
    "compare_speed",
    "evaluate_glue",
    "extend_positions",
    "from_pretrained",
    "load_metric",
    "load_recipe",
    "parse_pattern",
    "push_to_hub",
    "remove_attention",
    "remove_units",
    "render_model_card",
    "report",
    "run_recipe",
    "save_pretrained",
    "sparsify",
    "to_dense",
    "train_loop",
    "verify_checkpoint",
]
