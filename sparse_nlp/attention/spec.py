"""`MaskSpec`: what our mask function hands to our attention function instead of a dense mask.

transformers builds one attention mask per forward pass through the mask registry and passes it, untouched,
to the attention function of every layer. Ours passes a small description (pattern, positions, padding)
instead of an (N, N) tensor, so the kernels can skip the masked-out blocks and memory stays linear in N.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import AttentionPatternError
from .patterns import Pattern, dense_mask


@dataclass
class MaskSpec:
    """The attention mask of one forward pass, described rather than materialised.

    Attributes:
        pattern: The sparse pattern (on logical positions).
        kernel: Kernel name requested (``auto``, ``reference``, ``blocked``, ``flex``).
        batch: Batch size.
        q_positions: (Lq,) raw indices of the queries in the (padded) sequence.
        kv_positions: (Lk,) raw indices of the keys (not contiguous for a sinks + window cache).
        padding: (B, Lk) bool, True for real tokens, or None when nothing is padded.
        shift: (B,) left-padding count per row, or None when no row is left-padded.
        token_flags: (B, T) bool, True where the token id is global, or None.
        extra: transformers' own mask function when it is more than plain causal / bidirectional (e.g.
            a model's sliding window or packed sequences); only the reference kernel applies it.
        block_size: Block size of the blocked kernel (0: its default).
        cache: Index and mask tensors a kernel derived from this spec, reused by every layer of the pass.
    """

    pattern: Pattern
    kernel: str
    batch: int
    q_positions: torch.Tensor
    kv_positions: torch.Tensor
    padding: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    token_flags: torch.Tensor | None = None
    extra: Callable | None = None
    block_size: int = 0
    cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def q_length(self) -> int:
        return self.q_positions.numel()

    @property
    def kv_length(self) -> int:
        return self.kv_positions.numel()

    def is_self_attention(self) -> bool:
        """Queries and keys are the same contiguous positions starting at 0 (no cache): band kernels apply."""
        n = self.q_length
        return (
            n == self.kv_length
            and int(self.q_positions[0]) == 0
            and int(self.kv_positions[0]) == 0
            and int(self.q_positions[-1]) == n - 1
            and int(self.kv_positions[-1]) == n - 1
        )

    def extra_is_redundant(self) -> bool:
        """Whether `extra` allows every (query, key) pair that the pattern allows, so it removes nothing.

        Checked on the pairs a band pattern can allow - each query's band and the global rows and columns, by
        evaluating `extra` on those index pairs (a few times N x band width) - for self-attention only. True lets
        the band kernels run without `extra`: e.g. a Mistral checkpoint's own ``sliding_window`` of 4,096 around
        a pattern with a window of 256 and no global tokens. Patterns without a band form, or with global tokens
        by id, answer False (the reference kernel then applies `extra`).
        """
        band = self.pattern.band()
        if (
            self.extra is None
            or band is None
            or band.token_ids
            or not band.has_band
            or not self.is_self_attention()
        ):
            return False
        n, device = self.q_length, self.q_positions.device
        b = torch.arange(self.batch, device=device).view(-1, 1, 1)
        h = torch.zeros((), dtype=torch.long, device=device)
        q = torch.arange(n, device=device).view(1, -1, 1)
        k = q + torch.arange(-band.left, band.right + 1, device=device).view(1, 1, -1)
        outside = (k < 0) | (k >= n)
        if not bool((self.extra(b, h, q, k.clamp(0, n - 1)) | outside).all()):
            return False
        if not band.positions:
            return True
        shift = self.shift.view(-1, 1, 1) if self.shift is not None else torch.zeros_like(b)
        g = torch.tensor(band.positions, device=device).view(1, 1, -1) + shift  # (B, 1, g) raw indices
        g_outside = g >= n
        g = g.clamp(max=n - 1)
        cols = self.extra(b, h, q, g) | g_outside  # (B, N, g): every query sees the global keys
        g_q, keys = g.transpose(1, 2), q.transpose(1, 2)  # (B, g, 1) global queries, (1, 1, N) keys
        rows = self.extra(b, h, g_q, keys) | g_outside.transpose(1, 2)  # (B, g, N): they see every key
        if band.causal:  # only the pairs with the key at or before the query
            cols |= g > q
            rows |= keys > g_q
        return bool(cols.all()) and bool(rows.all())

    def dense(self) -> torch.Tensor:
        """The full (B, 1, Lq, Lk) bool mask: pattern, padding and transformers' extra mask together."""
        mask = dense_mask(
            self.pattern,
            self.q_positions,
            self.kv_positions,
            batch=self.batch,
            shift=self.shift,
            token_flags=self.token_flags,
        )
        if self.padding is not None:
            mask = mask & self.padding[:, None, :]
        if self.extra is not None:
            b = torch.arange(self.batch, device=mask.device).view(-1, 1, 1, 1)
            h = torch.zeros(1, dtype=torch.long, device=mask.device).view(1, 1, 1, 1)
            q = self.q_positions.view(1, 1, -1, 1)
            kv = self.kv_positions.view(1, 1, 1, -1)
            mask = mask[:, None] & self.extra(b, h, q, kv).expand(
                self.batch, 1, self.q_length, self.kv_length
            )
            return mask
        return mask[:, None]

    def check_positions(self) -> None:
        """Explicit pattern positions must lie inside the sequence (a global position beyond it is an error)."""
        top = self.pattern.max_position()
        if top is None:
            return
        length = int(self.kv_positions.max()) + 1
        if self.shift is not None:
            length -= int(self.shift.max())
        if top >= length and int(self.q_positions[0]) == 0:
            raise AttentionPatternError(
                f"attention pattern {self.pattern.name!r} names position {top}, beyond this input of {length} tokens; "
                "use global positions inside every sequence (e.g. 0 for CLS) or pad the input."
            )


def left_shift(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B,) count of leading padding positions per row of a (B, T) mask, or None when no row starts padded."""
    if attention_mask is None or attention_mask.ndim != 2 or attention_mask.shape[1] == 0:
        return None
    mask = attention_mask.bool()
    if bool(mask[:, 0].all()):
        return None
    first = torch.argmax(mask.to(torch.int8), dim=1)
    return torch.where(mask.any(dim=1), first, torch.zeros_like(first))
