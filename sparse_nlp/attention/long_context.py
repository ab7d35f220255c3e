"""Long-context conversion for models with absolute position embeddings (the Longformer recipe).

`extend_positions(model, 4096)` grows the learned position table by tiling the pretrained rows: position p
of the new table is position ``p mod n`` of the old one (after RoBERTa's padding offset). Nearby positions
keep their learned relations, so a window pattern works at once and fine-tuning starts close. The new
length goes into the config, so a save / load round trip gives back the extended model.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import AttentionPatternError
from ..targets import model_targets

logger = logging.getLogger(__name__)

# where the learned absolute position table lives, relative to model.base_model, per model_type
POSITION_TABLES: dict[str, str] = {
    "bert": "embeddings.position_embeddings",
    "roberta": "embeddings.position_embeddings",
    "distilbert": "embeddings.position_embeddings",
    "gpt2": "wpe",
}


def _offset(model: nn.Module) -> int:
    """Leading rows that are not ordinary positions (RoBERTa counts positions from padding_idx + 1)."""
    if model.config.model_type == "roberta":
        return int(model.config.pad_token_id) + 1
    return 0


def token_positions(model: nn.Module) -> int:
    """How many tokens `model`'s learned position table holds (its rows less RoBERTa's padding offset)."""
    return position_table(model).num_embeddings - _offset(model)


def position_table(model: nn.Module, field: str = "max_positions") -> nn.Embedding:
    """The learned absolute position table of `model`; raises `AttentionPatternError` (naming `field`) where the
    family has none (rotary positions) or uses fixed sinusoidal rows."""
    model_targets(model)  # unsupported families fail with the usual message
    model_type = model.config.model_type
    if model_type not in POSITION_TABLES:
        raise AttentionPatternError(
            f"{field}: {model_type} has no learned absolute position table (it uses rotary positions); extend its "
            "context through its rope settings instead."
        )
    if getattr(model.config, "sinusoidal_pos_embds", False):
        raise AttentionPatternError(
            f"{field}: this DistilBERT uses fixed sinusoidal positions; tiling learned rows does not apply."
        )
    base = getattr(model, "base_model", model)
    return base.get_submodule(POSITION_TABLES[model_type])


def extend_positions(model: nn.Module, max_positions: int) -> nn.Module:
    """Extend the absolute position embeddings of `model` to `max_positions` by tiling the pretrained ones, in place.

    Args:
        model: A transformers model of a family with learned absolute positions (bert, roberta, distilbert, gpt2).
        max_positions: New number of positions (larger than the current one).

    Returns:
        The same model, with ``config.max_position_embeddings`` (``n_positions`` for GPT-2) updated.

    Raises:
        AttentionPatternError: the family has rotary / no learned positions, or `max_positions` is not larger.
    """
    old = position_table(model)
    model_type = model.config.model_type
    base = getattr(model, "base_model", model)
    offset = _offset(model)
    current = old.num_embeddings
    if isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions <= current:
        raise AttentionPatternError(
            f"max_positions must be an integer larger than the current {current} positions, got {max_positions!r}."
        )
    learned = old.weight.detach()[offset:]  # (n, H)
    rows = torch.arange(max_positions - offset, device=learned.device) % learned.shape[0]
    new = nn.Embedding(
        max_positions,
        old.embedding_dim,
        padding_idx=old.padding_idx,
        device=learned.device,
        dtype=learned.dtype,
    )
    new.weight.requires_grad_(old.weight.requires_grad)  # a frozen table stays frozen
    with torch.no_grad():
        new.weight[:offset] = old.weight[:offset]
        new.weight[offset:] = learned[rows]
    parent_name, _, attr = POSITION_TABLES[model_type].rpartition(".")
    parent = base.get_submodule(parent_name) if parent_name else base
    setattr(parent, attr, new)
    for buffer in ("position_ids", "token_type_ids"):
        if buffer in parent._buffers:
            old_buf = parent._buffers[buffer]
            value = torch.arange(max_positions, device=old_buf.device).expand(1, -1)
            parent._buffers[buffer] = value if buffer == "position_ids" else torch.zeros_like(value)
    if model_type == "gpt2":
        model.config.n_positions = max_positions
    model.config.max_position_embeddings = max_positions
    logger.info("extended %s positions from %d to %d by tiling", model_type, current, max_positions)
    return model
