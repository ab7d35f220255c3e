"""sparse_nlp: make Hugging Face transformer models sparse and keep them sparse.

Public API::

    import sparse_nlp
    config = sparse_nlp.SparsityConfig.magnitude(0.5, targets="ffn")
    sparse_nlp.sparsify(model, config)
    print(sparse_nlp.report(model))
    sparse_nlp.save_pretrained(model, "out/")
    model = sparse_nlp.from_pretrained("out/")

``import sparse_nlp`` loads only the configs and the errors; the verbs (and the other names listed in
``_LAZY``) import their module, and with it torch and transformers, on first use. The ``sparse_nlp``
attention implementation is registered with transformers as soon as transformers loads its model code
(see `sparse_nlp.attention.hook`), so a config.json naming it loads after ``import sparse_nlp``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from .attention import hook as _hook
from .config import ActivationSparsity, AttentionSparsity, SparsityConfig, StructuredSparsity, WeightSparsity
from .errors import SparseNLPError
from .version import __version__

_hook.install()

# name -> the module that defines it; imported on first access (a deliberate lazy import: torch, transformers)
_VERBS = {
    "sparsify": "sparse_nlp.sparsify",
    "to_dense": "sparse_nlp.sparsify",
    "report": "sparse_nlp.report",
    "save_pretrained": "sparse_nlp.checkpoint",
    "from_pretrained": "sparse_nlp.checkpoint",
    "compact_checkpoint": "sparse_nlp.checkpoint",
    "verify_checkpoint": "sparse_nlp.checkpoint",
    "push_to_hub": "sparse_nlp.hub",
    "evaluate_glue": "sparse_nlp.evaluation.tasks",
    "compare_speed": "sparse_nlp.evaluation.speed",
    "load_recipe": "sparse_nlp.recipes",
    "run_recipe": "sparse_nlp.recipes",
    "apply_attention": "sparse_nlp.attention.apply",
    "remove_attention": "sparse_nlp.attention.apply",
    "apply_structured": "sparse_nlp.structured",
}
_OTHER = {  # importable here as before; their modules are the documented place
    "SinkWindowCache": "sparse_nlp.attention.cache",
    "extend_positions": "sparse_nlp.attention.long_context",
    "build_pattern": "sparse_nlp.attention.patterns",
    "FORMAT_VERSION": "sparse_nlp.config",
    "load_metric": "sparse_nlp.evaluation.metrics",
    "render_model_card": "sparse_nlp.hub",
    "apply_masks": "sparse_nlp.pruning.masking",
    "NM": "sparse_nlp.pruning.patterns",
    "Block": "sparse_nlp.pruning.patterns",
    "Unstructured": "sparse_nlp.pruning.patterns",
    "parse_pattern": "sparse_nlp.pruning.patterns",
    "CubicSchedule": "sparse_nlp.pruning.schedules",
    "SparsityReport": "sparse_nlp.report",
    "remove_units": "sparse_nlp.structured.removal",
    "MovementTracker": "sparse_nlp.structured.scores",
    "DistillationConfig": "sparse_nlp.training",
    "Distiller": "sparse_nlp.training",
    "GradualPruner": "sparse_nlp.training",
    "LoopConfig": "sparse_nlp.training",
    "SparsityCallback": "sparse_nlp.training",
    "train_loop": "sparse_nlp.training",
    **{
        name: "sparse_nlp.errors"
        for name in (
            "AttentionPatternError",
            "CheckpointError",
            "CompactFormatError",
            "ConfigError",
            "HubError",
            "MetadataError",
            "PatternError",
            "RegistryError",
            "StructuredError",
            "TargetError",
            "UnsupportedModelError",
        )
    },
}
_LAZY = {**_VERBS, **_OTHER}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sparse_nlp' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


class _Package(types.ModuleType):
    """This package's module type: a verb stays a verb when its same-named submodule is imported.

    Importing ``sparse_nlp.sparsify`` (the module) sets the attribute ``sparse_nlp.sparsify``; without this the
    function `sparsify` would be replaced by the module of that name.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "ActivationSparsity",
    "AttentionSparsity",
    "SparseNLPError",
    "SparsityConfig",
    "StructuredSparsity",
    "WeightSparsity",
    "__version__",
    *_VERBS,
]
