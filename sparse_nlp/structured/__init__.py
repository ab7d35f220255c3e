"""Structured sparsity: remove whole attention heads and FFN neurons, so the matrices shrink.

`apply_structured(model, cfg)` scores the units (`scores`), chooses the lowest ones under the budget, removes
them physically (`removal`) and records the new per-layer shapes in our metadata (`shapes`), from which
`sparse_nlp.from_pretrained` rebuilds the model before reading its weights.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ..config import StructuredSparsity
from ..errors import ConfigError, StructuredError
from ..registry import STRUCTURED_SCORES
from ..targets import require
from .removal import (
    EmptyAttention,
    LayerLayout,
    keep_ffn,
    keep_heads,
    layer_layout,
    model_layout,
    remove_units,
    zero_units,
)
from .scores import MovementTracker, ScoreContext, UnitScores, select_units
from .shapes import load_structured, record_shapes, shape_record

logger = logging.getLogger(__name__)

OPTION_DEFAULTS: dict[str, Any] = {
    "num_batches": 8,
    "batch_size": 16,
    "seq_len": 128,
    "normalize": True,
    "min_heads": 0,
    "min_ffn": 0,
}
"""Options of `StructuredSparsity.options` and their defaults."""


def plan_removal(
    model: nn.Module, cfg: StructuredSparsity, scores: UnitScores
) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """The units `cfg` removes given `scores`: (heads, ffn), each block index -> unit indices."""
    opts = {**OPTION_DEFAULTS, **cfg.options}
    heads = select_units(
        scores.heads, cfg.heads, cfg.scope, min_keep=opts["min_heads"], normalize=opts["normalize"]
    )
    ffn = select_units(scores.ffn, cfg.ffn, cfg.scope, min_keep=opts["min_ffn"], normalize=opts["normalize"])
    return heads, ffn


def apply_structured(
    model: nn.Module,
    cfg: StructuredSparsity,
    *,
    data: Any = None,
    tokenizer: Any = None,
    progress: bool = True,
) -> list[LayerLayout]:
    """Remove the least important heads and FFN neurons of `model`, in place, and record the new shapes.

    Args:
        model: A transformers model of a family in `sparse_nlp.targets.TARGETS`.
        cfg: Budgets (``heads``, ``ffn`` fractions; KV groups for GQA), ``score`` name, ``scope`` and options:
            ``num_batches``, ``batch_size``, ``seq_len`` (data-based scores), ``normalize`` (per-layer L2
            normalisation before a global ranking), ``min_heads``/``min_ffn`` (units every block keeps).
        data: Texts or batches of tensors for ``taylor`` / ``movement`` (batches may carry ``labels``).
        tokenizer: Tokenizer for text data.
        progress: Show a progress bar while scoring.

    Returns:
        The new layout of every block.
    """
    require(model, "structured")  # families with fused or shared projections are refused with the reason
    unknown = sorted(set(cfg.options) - set(OPTION_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"structured.options: unknown option(s) {unknown}; known: {', '.join(OPTION_DEFAULTS)}."
        )
    opts = {**OPTION_DEFAULTS, **cfg.options}
    score_fn = STRUCTURED_SCORES.get(cfg.score)
    ctx = ScoreContext(
        data=data,
        tokenizer=tokenizer,
        batch_size=opts["batch_size"],
        seq_len=opts["seq_len"],
        num_batches=opts["num_batches"],
        progress=progress,
    )
    scores = score_fn(model, ctx)
    heads, ffn = plan_removal(model, cfg, scores)
    layouts = remove_units(model, heads, ffn)
    record_shapes(model, cfg)
    logger.info(
        "structured: removed %d head units and %d FFN neurons",
        sum(len(v) for v in heads.values()),
        sum(len(v) for v in ffn.values()),
    )
    return layouts


__all__ = [
    "EmptyAttention",
    "LayerLayout",
    "MovementTracker",
    "OPTION_DEFAULTS",
    "StructuredError",
    "UnitScores",
    "apply_structured",
    "keep_ffn",
    "keep_heads",
    "layer_layout",
    "load_structured",
    "model_layout",
    "plan_removal",
    "record_shapes",
    "remove_units",
    "select_units",
    "shape_record",
    "zero_units",
]
