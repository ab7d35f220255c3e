"""The flex kernel: compiled `flex_attention` with a cached BlockMask (inference only on CPU).

torch's flex_attention skips whole 128 x 128 blocks that the BlockMask marks empty. On CPU it has a
compiled forward but no backward, and every new shape costs a compile (4-14 s) with a silent fall back to
eager after 8 recompiles. So lengths are rounded up to a multiple of `BUCKET` (one compile and one
BlockMask per bucket, reused across batches), padding enters through a score modifier rather than the
BlockMask (so the cached BlockMask does not depend on the batch), batch rows run one at a time (so the
batch size never triggers a recompile), and autograd calls are refused: also on a GPU, where flex_attention has a
backward, because rows with no allowed key (padding rows, the rows added to fill a bucket) have not been checked to
give finite gradients there (torch issue 153799 reports NaN gradients with a score modifier at lengths that are
not a multiple of 128).
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict

import torch
import torch.nn.functional as F

from ...errors import FlexUnsupported
from ...registry import ATTENTION_KERNELS
from ..patterns import MaskContext, Pattern
from ..spec import MaskSpec

logger = logging.getLogger(__name__)

BUCKET = 128
_MAX_CACHED = 32
_block_masks: OrderedDict[tuple, object] = OrderedDict()


def supports(spec: MaskSpec, needs_grad: bool, dropout: float = 0.0) -> bool:
    """Whether flex can run `spec`: inference (no gradients, no attention dropout) of plain self-attention."""
    return (
        not needs_grad
        and not dropout
        and spec.extra is None
        and spec.shift is None
        and not spec.pattern.uses_token_ids()
        and spec.is_self_attention()
    )


@functools.cache
def _compiled(compile: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compile else flex_attention


def block_mask_for(pattern: Pattern, length: int, device: torch.device):
    """The BlockMask of `pattern` for a bucketed self-attention length (cached, least recently used out)."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (pattern.key(), length, str(device))
    if key in _block_masks:
        _block_masks.move_to_end(key)
        return _block_masks[key]

    def mask_mod(b, h, q_idx, kv_idx):
        return pattern.allowed(q_idx, kv_idx, MaskContext(batch=b))

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=length, KV_LEN=length, device=device)
    _block_masks[key] = block_mask
    if len(_block_masks) > _MAX_CACHED:
        _block_masks.popitem(last=False)
    logger.debug("built flex BlockMask for %s at length %d", pattern.name, length)
    return block_mask


@ATTENTION_KERNELS.register("flex")
def flex_attention_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    spec: MaskSpec,
    scaling: float,
    dropout: float = 0.0,
    *,
    compile: bool = True,
) -> torch.Tensor:
    """Attention under `spec` with flex_attention and a cached BlockMask (forward only).

    Args:
        query: (B, H, N, D).
        key, value: (B, Hkv, N, D).
        spec: Mask description (self-attention without left padding or token-id globals).
        scaling: Score scale.
        dropout: Must be 0 (flex has no dropout).
        compile: Compile flex_attention (False runs the slow eager version, for tests).

    Returns:
        (B, H, N, D).

    Raises:
        FlexUnsupported: gradients are needed, or the call is not plain self-attention.
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if not supports(spec, needs_grad):
        raise FlexUnsupported(
            "the flex kernel runs only inference self-attention without left padding or token-id globals "
            "(flex_attention has no backward on CPU); use kernel 'blocked' or 'reference'."
        )
    if dropout:
        raise FlexUnsupported(
            "the flex kernel has no attention dropout; call model.eval() or use kernel 'blocked'."
        )
    query, key, value = query.detach(), key.detach(), value.detach()  # no autograd here (checked above)
    bsz, heads, n, _ = query.shape
    length = -(-n // BUCKET) * BUCKET
    pad = length - n
    if pad:
        query, key, value = (F.pad(t, (0, 0, 0, pad)) for t in (query, key, value))
    real = torch.zeros(bsz, length, dtype=torch.bool, device=query.device)
    real[:, :n] = True if spec.padding is None else spec.padding.to(query.device)
    block_mask = block_mask_for(spec.pattern, length, query.device)
    gqa = key.shape[1] != heads
    flex = _compiled(compile)
    rows = []
    # One row at a time, always with the padding score modifier: every call in a bucket then has the same
    # shapes and graph, so a bucket compiles once whatever the batch size or padding (a new batch size
    # would otherwise recompile, and after 8 recompiles torch silently falls back to eager).
    for b in range(bsz):
        row_real = real[b : b + 1]

        def score_mod(score, b_, h, q_idx, kv_idx, row_real=row_real):
            return torch.where(row_real[0, kv_idx], score, -float("inf"))

        rows.append(
            flex(
                query[b : b + 1].contiguous(),
                key[b : b + 1].contiguous(),
                value[b : b + 1].contiguous(),
                score_mod=score_mod,
                block_mask=block_mask,
                scale=scaling,
                enable_gqa=gqa,
            )
        )
    out = torch.cat(rows) if bsz > 1 else rows[0]
    return torch.nan_to_num(out[:, :, :n], nan=0.0)  # rows with no allowed key: 0, as in the reference
