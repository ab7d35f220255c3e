"""One attention implementation, ``sparse_nlp``, registered with both of transformers' registries.

- `transformers.masking_utils.AttentionMaskInterface`: our mask function returns a `MaskSpec` (pattern,
  positions, padding) instead of a tensor. Because the name is registered there, transformers never takes
  its "no mask needed" shortcut (which would drop the pattern on unpadded input) and padding reaches us.
- `transformers.AttentionInterface`: our attention function runs a kernel on that spec.

The pattern travels on the model config (``config.sparse_attention``, written to config.json) and the
implementation name as the config.json key ``attn_implementation``, which transformers honours on load once
``import sparse_nlp`` has registered the name - and refuses, loudly, without it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
)

from ..errors import AttentionPatternError
from .kernels import run_kernel
from .kernels.reference import softcapped_attention
from .patterns import build_pattern
from .spec import MaskSpec, left_shift

ATTN_NAME = "sparse_nlp"
"""The ``attn_implementation`` name of sparse attention."""
CONFIG_KEY = "sparse_attention"
"""Config attribute (and config.json key) holding the `AttentionSparsity` as a dict."""

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_registered = False
# input ids of the latest forward pass, per model config, for global-tokens-by-id patterns
_token_ids: dict[int, torch.Tensor] = {}


def settings(config: Any) -> dict[str, Any]:
    """The ``sparse_attention`` dict on a transformers config; a clear error when it is missing."""
    value = getattr(config, CONFIG_KEY, None)
    if not isinstance(value, dict) or "pattern" not in value:
        raise AttentionPatternError(
            f"attn_implementation is {ATTN_NAME!r} but the model config has no valid {CONFIG_KEY!r} entry "
            f"(got {value!r:.80}); apply a pattern with sparse_nlp.apply_attention(model, AttentionSparsity(...))."
        )
    return value


def remember_input_ids(config: Any, input_ids: torch.Tensor | None) -> None:
    _token_ids[id(config)] = input_ids


def forget_input_ids(config: Any) -> None:
    _token_ids.pop(id(config), None)


def _kv_positions(kv_length: int, kv_offset: int, q_offset: int, q_length: int, device) -> torch.Tensor:
    if kv_offset >= 0:
        return torch.arange(kv_offset, kv_offset + kv_length, device=device)
    # a sinks + window cache (sparse_nlp.attention.cache): it keeps the first -kv_offset positions and the most
    # recent ones, which end with the current queries
    prefix = -kv_offset
    total = q_offset + q_length
    recent = kv_length - prefix
    return torch.cat(
        [torch.arange(prefix, device=device), torch.arange(total - recent, total, device=device)]
    )


def sparse_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    config: Any = None,
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> MaskSpec:
    """Our `AttentionMaskInterface` function: describe the mask (never None, never a dense tensor)."""
    if config is None:
        raise AttentionPatternError(
            f"the {ATTN_NAME!r} mask function needs the model config (transformers passes it)."
        )
    chosen = settings(config)
    pattern = build_pattern(chosen["pattern"], chosen.get("options", {}))
    q_offset = int(q_offset)
    q_positions = torch.arange(q_offset, q_offset + q_length, device=device)
    kv_positions = _kv_positions(kv_length, int(kv_offset), q_offset, q_length, device)
    padding = shift = None
    if attention_mask is not None and attention_mask.ndim == 2:
        mask2d = attention_mask.to(device=device, dtype=torch.bool)
        need = int(kv_positions.max()) + 1
        if mask2d.shape[1] < need:
            mask2d = torch.nn.functional.pad(mask2d, (0, need - mask2d.shape[1]), value=True)
        shift = left_shift(mask2d)
        if not bool(mask2d.all()):
            padding = mask2d[:, kv_positions]
    token_flags = None
    if pattern.uses_token_ids():
        ids = _token_ids.get(id(config))
        if ids is None or ids.shape[0] != batch_size:
            raise AttentionPatternError(
                "this attention pattern makes tokens global by id and needs the input ids: call the model with "
                "input_ids (not inputs_embeds), on a model prepared by sparse_nlp.apply_attention / from_pretrained."
            )
        wanted = torch.tensor(sorted(_token_id_set(pattern)), device=ids.device)
        token_flags = torch.isin(ids, wanted).to(device)
    extra = (
        None if mask_function in (None, causal_mask_function, bidirectional_mask_function) else mask_function
    )
    spec = MaskSpec(
        pattern=pattern,
        kernel=chosen.get("kernel", "auto"),
        batch=batch_size,
        q_positions=q_positions,
        kv_positions=kv_positions,
        padding=padding,
        shift=shift,
        token_flags=token_flags,
        extra=extra,
        block_size=int(chosen.get("block_size", 0) or 0),
    )
    spec.check_positions()
    if spec.extra_is_redundant():  # e.g. the model's own sliding window, wider than the pattern
        spec.extra = None  # the band kernels can run
    return spec


def _token_id_set(pattern) -> set[int]:
    band = pattern.band()
    if band is not None:
        return set(band.token_ids)
    found: set[int] = set()
    for part in getattr(pattern, "parts", (pattern,)):
        found |= set(getattr(part, "token_ids", ()))
    return found


_warned_softcap = False


def _warn_softcap_kernel_once(spec: MaskSpec) -> None:
    """Say once per process that a soft-capping model runs the reference kernel whatever kernel was asked."""
    global _warned_softcap
    if _warned_softcap or spec.kernel in ("auto", "reference"):
        return
    _warned_softcap = True
    logger.warning(
        "the model soft-caps its attention logits; sparse attention runs the reference kernel (exact, no faster "
        "than dense) instead of the requested %r kernel, which has no soft-capping.",
        spec.kernel,
    )


def sparse_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Our `AttentionInterface` function: (B, H, L, D) inputs -> ((B, L, H, D) output, no weights)."""
    if not isinstance(attention_mask, MaskSpec):
        raise AttentionPatternError(
            f"attn_implementation {ATTN_NAME!r} got attention_mask of type {type(attention_mask).__name__} instead of the "
            "sparse mask description; do not pass a prepared 4-D mask to a model with sparse attention "
            "(pass the usual 2-D padding mask)."
        )
    if kwargs.get("output_attentions"):
        raise AttentionPatternError(
            "sparse attention does not return attention weights (output_attentions=True)."
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    softcap = kwargs.get("softcap")
    if softcap is not None:  # Gemma 2's attn_logit_softcapping: only the explicit-score kernel applies it
        if not softcap > 0:
            raise AttentionPatternError(f"attention softcap must be > 0, got {softcap!r}.")
        _warn_softcap_kernel_once(attention_mask)
        out = softcapped_attention(query, key, value, attention_mask, scale, float(softcap), dropout)
    else:
        out = run_kernel(query, key, value, attention_mask, scale, dropout)  # (B, H, L, D)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``sparse_nlp`` with transformers' attention and mask registries (idempotent)."""
    global _registered
    with _lock:
        if _registered:
            return
        AttentionInterface.register(ATTN_NAME, sparse_attention_forward)
        AttentionMaskInterface.register(ATTN_NAME, sparse_mask)
        _registered = True


register()
