"""sparse_nlp: make Hugging Face transformer models sparse and keep them sparse.

Public API::

    import sparse_nlp
    config = sparse_nlp.SparsityConfig.magnitude(0.5, targets="ffn")
    sparse_nlp.sparsify(model, config)
    print(sparse_nlp.report(model))
    sparse_nlp.save_pretrained(model, "out/")
    model = sparse_nlp.from_pretrained("out/")
"""

__version__ = "0.1.0"

from . import attention  # noqa: F401  (registers the "sparse_nlp" attention implementation with transformers)
from .checkpoint import CheckpointError, from_pretrained, save_pretrained
from .config import (
    FORMAT_VERSION,
    ActivationSparsity,
    AttentionSparsity,
    ConfigError,
    SparsityConfig,
    StructuredSparsity,
    WeightSparsity,
)
from .metadata import MetadataError
from .pruning.masking import apply_masks
from .pruning.patterns import NM, Block, PatternError, Unstructured, parse_pattern
from .registry import RegistryError
from .report import SparsityReport, report
from .sparsify import sparsify, to_dense
from .targets import TargetError, UnsupportedModelError

__all__ = [
    "FORMAT_VERSION",
    "NM",
    "ActivationSparsity",
    "AttentionSparsity",
    "Block",
    "CheckpointError",
    "ConfigError",
    "MetadataError",
    "PatternError",
    "RegistryError",
    "SparsityConfig",
    "SparsityReport",
    "StructuredSparsity",
    "TargetError",
    "Unstructured",
    "UnsupportedModelError",
    "WeightSparsity",
    "__version__",
    "apply_masks",
    "from_pretrained",
    "parse_pattern",
    "report",
    "save_pretrained",
    "sparsify",
    "to_dense",
]
