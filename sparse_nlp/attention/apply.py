"""`apply_attention(model, AttentionSparsity)` and `remove_attention(model)`: switch sparse attention on and off."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ..config import AttentionSparsity
from ..errors import AttentionPatternError, ConfigError
from ..targets import require
from . import registration
from .long_context import extend_positions, position_table
from .patterns import Pattern, build_pattern

logger = logging.getLogger(__name__)

_HOOK_ATTR = "_sparse_nlp_ids_hook"


def check_pattern(model: nn.Module, attention: AttentionSparsity) -> Pattern:
    """Build the pattern and check that it fits the model; raises `AttentionPatternError` naming the problem."""
    entry = require(model, "attention")  # families whose attention a pattern cannot drive are refused here
    try:  # the fields on their own (options, kernel, block size, max_positions): AttentionSparsity's own checks
        attention.validate()
    except ConfigError as err:
        raise AttentionPatternError(str(err)) from None
    pattern = build_pattern(attention.pattern, attention.options)
    model_type = model.config.model_type
    if entry.causal and not pattern.causal:
        raise AttentionPatternError(
            f"attention pattern {attention.pattern!r} is bidirectional but {model_type} is a causal decoder: "
            "a token would see the future. Set options.causal = true (or use sink_window)."
        )
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(
        model.config, "n_positions", None
    )
    if attention.max_positions:
        current = position_table(model, "attention.max_positions").num_embeddings
        if attention.max_positions < current:
            raise AttentionPatternError(
                f"attention.max_positions is {attention.max_positions}, below the {current} positions {model_type} "
                "already holds; positions are only extended (0 keeps them)."
            )
        limit = attention.max_positions
    top = pattern.max_position()
    if top is not None and limit is not None and top >= limit:
        raise AttentionPatternError(
            f"attention pattern names position {top}, beyond the {limit} positions {model_type} can hold "
            "(max_position_embeddings); use positions inside the sequence."
        )
    if attention.kernel == "blocked" and (pattern.band() is None or not pattern.band().has_band):
        raise AttentionPatternError(
            f"attention.kernel 'blocked' runs window + global-token patterns only; {attention.pattern!r} has no band "
            "form. Use kernel 'auto', 'flex' or 'reference'."
        )
    if pattern.uses_token_ids() and model.get_input_embeddings() is None:
        raise AttentionPatternError("global tokens by id need the model's input embeddings to see the ids.")
    return pattern


def extend_for(model: nn.Module, attention: AttentionSparsity) -> None:
    """Extend `model`'s learned positions to ``attention.max_positions`` (after `check_pattern`); a model that
    already holds that many is left as it is."""
    if attention.max_positions and attention.max_positions > position_table(model).num_embeddings:
        extend_positions(model, attention.max_positions)


def _remember_ids(module: nn.Module, args: tuple, kwargs: dict) -> None:
    ids = args[0] if args else kwargs.get("input")
    registration.remember_input_ids(module._sparse_nlp_config, ids)


def apply_attention(model: nn.Module, attention: AttentionSparsity | dict[str, Any]) -> nn.Module:
    """Make `model` use the sparse attention pattern `attention`, through transformers' registries, in place.

    The settings go on ``model.config`` (saved in config.json); ``model.config.attn_implementation`` becomes
    ``"sparse_nlp"``. Calling it again replaces the pattern.

    Args:
        model: A transformers model of a family in `sparse_nlp.targets.TARGETS`.
        attention: The pattern, options and kernel (or their dict form). With ``max_positions`` the learned
            position table is first extended to that many positions (`extend_positions`); a model that already
            has them is left as it is, so applying a saved config again changes nothing.

    Returns:
        The same model.

    Raises:
        AttentionPatternError: bad options, a bidirectional pattern on a causal decoder, a position beyond
            the model's positions, a kernel that cannot run the pattern, or ``max_positions`` on a family
            without learned positions or below the model's own.
        UnsupportedModelError: a model family outside the targets table.
    """
    if isinstance(attention, dict):
        attention = AttentionSparsity(**attention)
    pattern = check_pattern(model, attention)
    extend_for(model, attention)
    registration.register()
    remove_attention(model, restore="keep")
    model.config.sparse_attention = attention.to_dict()
    model.set_attn_implementation(registration.ATTN_NAME)
    model.config.attn_implementation = registration.ATTN_NAME  # written to config.json, honoured on load
    if pattern.uses_token_ids():
        embeddings = model.get_input_embeddings()
        embeddings._sparse_nlp_config = model.config
        setattr(model, _HOOK_ATTR, embeddings.register_forward_pre_hook(_remember_ids, with_kwargs=True))
    logger.info(
        "sparse attention %s (kernel %s) on %s", attention.pattern, attention.kernel, type(model).__name__
    )
    return model


def remove_attention(model: nn.Module, restore: str = "sdpa") -> nn.Module:
    """Undo `apply_attention`: back to ``restore`` attention, settings removed from the config.

    The default ``sdpa`` becomes ``eager`` for a family without an SDPA path (Gemma 2); ``keep`` leaves the
    implementation name as it is.
    """
    hook = getattr(model, _HOOK_ATTR, None)
    if hook is not None:
        hook.remove()
        delattr(model, _HOOK_ATTR)
    registration.forget_input_ids(model.config)
    for key in (registration.CONFIG_KEY, "attn_implementation"):
        if key in model.config.__dict__:
            delattr(model.config, key)
    if restore != "keep" and model.config._attn_implementation == registration.ATTN_NAME:
        if restore == "sdpa" and not getattr(model, "_supports_sdpa", True):
            restore = "eager"  # a family without an SDPA path (Gemma 2: soft-capped logits)
        model.set_attn_implementation(restore)
    return model
