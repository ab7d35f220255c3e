"""A bounded KV cache for sinks + window decoding (StreamingLLM): the first positions plus the recent window.

With the ``sink_window`` pattern a query never looks past its `window` most recent positions and the
`sinks` first ones, so the cache needs to keep only those: memory stays at ``prefix + window - 1``
positions per layer however long the generation runs. Keys keep the rotary phases of their original
positions, so decoding with this cache gives the same tokens as recomputing the whole sequence under the
sparse pattern without a cache (tested).

It tells our mask function which positions it holds through the mask sizes it reports: a negative
``kv_offset`` of ``-prefix`` means "the first `prefix` positions, then the most recent ones".
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from ..errors import AttentionPatternError
from .patterns import SinkWindow, build_pattern
from .registration import settings
from .spec import left_shift


class SinkWindowLayer(DynamicLayer):
    """One layer's cache keeping the first `prefix` positions and the last ``window - 1``.

    Args:
        prefix: Leading positions kept (the sinks, plus left padding).
        window: Window of the pattern; the layer keeps ``window - 1`` recent positions between steps.
    """

    is_sliding = True

    def __init__(self, prefix: int, window: int) -> None:
        super().__init__()
        self.prefix = prefix
        self.window = window
        self.cumulative_length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the new (B, H, q, D) states; return all held + new states; keep only prefix + window - 1."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        full_k = torch.cat([self.keys, key_states], dim=-2)
        full_v = torch.cat([self.values, value_states], dim=-2)
        keep = self.prefix + self.window - 1
        if full_k.shape[-2] > keep:
            recent = self.window - 1
            self.keys = torch.cat(
                [full_k[:, :, : self.prefix], full_k[:, :, full_k.shape[-2] - recent :]], dim=-2
            )
            self.values = torch.cat(
                [full_v[:, :, : self.prefix], full_v[:, :, full_v.shape[-2] - recent :]], dim=-2
            )
        else:
            self.keys, self.values = full_k, full_v
        return full_k, full_v

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = 0 if not self.is_initialized else self.keys.shape[-2]
        if held == self.cumulative_length:
            return held + query_length, 0
        if self.prefix == 0:
            return held + query_length, self.cumulative_length - held
        return held + query_length, -self.prefix

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.prefix + self.window - 1

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a sinks + window cache cannot be rolled back (assisted decoding is not supported)."
        )


class SinkWindowCache(Cache):
    """KV cache for a model with the ``sink_window`` attention pattern; pass it to ``generate(cache=...)``
    (transformers 5.24 and later; ``generate(past_key_values=...)`` before 5.24).

    Args:
        model: A decoder prepared by `apply_attention` with the ``sink_window`` pattern.
        attention_mask: The (B, T) padding mask of the prompt when it is left-padded: the cache then also keeps
            the leading padding, so every row keeps its own sinks.
    """

    def __init__(self, model: nn.Module, attention_mask: torch.Tensor | None = None) -> None:
        chosen = settings(model.config)
        pattern = build_pattern(chosen["pattern"], chosen.get("options", {}))
        if not isinstance(pattern, SinkWindow):
            raise AttentionPatternError(
                f"SinkWindowCache needs the 'sink_window' attention pattern, the model has {chosen['pattern']!r}."
            )
        shift = left_shift(attention_mask)
        prefix = pattern.sinks + (int(shift.max()) if shift is not None else 0)
        layers = getattr(model.config, "num_hidden_layers", None) or model.config.n_layer
        super().__init__(layers=[SinkWindowLayer(prefix, pattern.window) for _ in range(layers)])
