"""Sparse attention patterns as composable, index-based mask functions.

A pattern says which key position each query position may attend to. Positions are *logical*: counted
from the first real token of a row, so a left-padded row sees the same pattern as the unpadded text
(padding itself is applied separately by the kernels). Every pattern is a typed value registered by name
in `sparse_nlp.registry.ATTENTION_PATTERNS` and built from the options dict of an `AttentionSparsity`::

    build_pattern("sliding_window", {"window": 256})
    build_pattern("union", {"patterns": [{"pattern": "sliding_window", "options": {"window": 256}},
                                         {"pattern": "global_tokens", "options": {"positions": [0]}}]})
    SlidingWindow(256) | GlobalTokens(positions=(0,))      # the same union, in Python

`allowed(q, kv, ctx)` takes broadcastable integer tensors of logical positions and returns a bool tensor.
It uses only element-wise tensor operations, so the same function builds dense masks, flex-attention
BlockMasks and the masks of the blocked kernel.

Window convention: ``window`` is the number of positions a query sees through the window. Causal windows
see the ``window`` most recent positions including their own (``0 <= q - kv < window``, as Mistral's
``sliding_window``); bidirectional windows see ``window // 2`` positions on each side and their own
(``|q - kv| <= window // 2``, Longformer's convention).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import AttentionPatternError, RegistryError
from ..registry import ATTENTION_PATTERNS


@dataclass
class MaskContext:
    """Per-row facts a pattern may need besides positions.

    Attributes:
        batch: Batch index tensor, broadcastable against the position tensors.
        shift: (B,) number of left-padding positions of each row (raw index = logical position + shift).
        token_flags: (B, T) bool, True at raw indices whose token id is global, or None.
    """

    batch: torch.Tensor
    shift: torch.Tensor | None = None
    token_flags: torch.Tensor | None = None


@dataclass(frozen=True)
class BandStructure:
    """What the blocked kernel needs: a band plus global positions (those patterns only).

    Attributes:
        left: Keys visible before the query (``q - kv <= left``); None when there is no band (global tokens only).
        right: Keys visible after the query (``kv - q <= right``); 0 for causal patterns; None with `left`.
        positions: Global logical positions (attend to everything allowed, attended by every query).
        token_ids: Token ids whose positions are global.
        causal: Whether every allowed key lies at or before its query.
    """

    left: int | None
    right: int | None
    positions: tuple[int, ...] = ()
    token_ids: tuple[int, ...] = ()
    causal: bool = False

    @property
    def has_band(self) -> bool:
        """Whether there is a window band (not only global tokens)."""
        return self.left is not None


def _check_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AttentionPatternError(f"attention.options.{name} must be an integer, got {value!r}.")
    if value < minimum:
        raise AttentionPatternError(f"attention.options.{name} must be >= {minimum}, got {value!r}.")
    return value


def _check_ints(name: str, values: Any, *, minimum: int) -> tuple[int, ...]:
    if isinstance(values, int) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, list | tuple):
        raise AttentionPatternError(f"attention.options.{name} must be a list of integers, got {values!r}.")
    return tuple(_check_int(f"{name}[{i}]", v, minimum=minimum) for i, v in enumerate(values))


def _causal(q: torch.Tensor, kv: torch.Tensor, allowed: torch.Tensor, causal: bool) -> torch.Tensor:
    return allowed & (kv <= q) if causal else allowed


class Pattern:
    """Base class of attention patterns: a typed value with `allowed`, a name and options."""

    name: ClassVar[str] = ""
    causal: bool = False

    def allowed(self, q: torch.Tensor, kv: torch.Tensor, ctx: MaskContext) -> torch.Tensor:
        """Bool tensor (broadcast of q and kv): may logical query position q attend to key position kv."""
        raise NotImplementedError

    def band(self) -> BandStructure | None:
        """The band + globals form for the blocked kernel, or None when the pattern has none."""
        return None

    def max_position(self) -> int | None:
        """The largest position the pattern names explicitly (checked against the sequence), or None."""
        return None

    def uses_token_ids(self) -> bool:
        return False

    def options(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_options(cls, options: dict[str, Any] | None = None) -> Pattern:
        """Build the pattern from an options dict (lists become tuples), naming an unknown or bad option.

        Raises:
            AttentionPatternError: an unknown option or a bad option value.
        """
        options = dict(options or {})
        known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise AttentionPatternError(
                f"attention.options: unknown option(s) {unknown} for pattern {cls.name!r}; known: {', '.join(known)}."
            )
        for key, value in list(options.items()):
            if isinstance(value, list):
                options[key] = tuple(value)
            if key == "causal" and not isinstance(value, bool):
                raise AttentionPatternError(f"attention.options.causal must be true or false, got {value!r}.")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.name, "options": self.options()}

    def key(self) -> str:
        """A hashable description, used to cache masks."""
        return repr(self.to_dict())

    def __or__(self, other: Pattern) -> Union:
        parts = (self.parts if isinstance(self, Union) else (self,)) + (
            other.parts if isinstance(other, Union) else (other,)
        )
        return Union(parts=parts)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Pattern):
        return value.to_dict()
    return value


@ATTENTION_PATTERNS.register("sliding_window")
@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """Local attention: causal (the `window` most recent positions) or bidirectional (window // 2 each side).

    Args:
        window: Positions seen through the window (> 0).
        causal: Causal (decoders) or bidirectional (encoders).
    """

    window: int = 256
    causal: bool = False
    name: ClassVar[str] = "sliding_window"

    def __post_init__(self) -> None:
        _check_int("window", self.window, minimum=1)
        if not self.causal and self.window < 2:
            raise AttentionPatternError(
                f"attention.options.window must be >= 2 for a bidirectional window (window // 2 on each side), got {self.window}."
            )

    def allowed(self, q, kv, ctx):
        d = q - kv
        if self.causal:
            return (d >= 0) & (d < self.window)
        half = self.window // 2
        return (d <= half) & (d >= -half)

    def band(self):
        if self.causal:
            return BandStructure(left=self.window - 1, right=0, causal=True)
        return BandStructure(left=self.window // 2, right=self.window // 2)


@ATTENTION_PATTERNS.register("global_tokens")
@dataclass(frozen=True)
class GlobalTokens(Pattern):
    """Global tokens: they attend to every position and every position attends to them.

    In a causal pattern a global token is a key visible to all later queries (an attention sink).

    Args:
        positions: Logical positions that are global (e.g. ``[0]`` for CLS).
        token_ids: Token ids whose occurrences are global (encoders only).
        causal: Restrict to keys at or before the query.
    """

    positions: tuple[int, ...] = (0,)
    token_ids: tuple[int, ...] = ()
    causal: bool = False
    name: ClassVar[str] = "global_tokens"

    def __post_init__(self) -> None:
        object.__setattr__(self, "positions", _check_ints("positions", self.positions, minimum=0))
        object.__setattr__(self, "token_ids", _check_ints("token_ids", self.token_ids, minimum=0))
        if not self.positions and not self.token_ids:
            raise AttentionPatternError("attention.options: global_tokens needs 'positions' or 'token_ids'.")
        if self.token_ids and self.causal:
            raise AttentionPatternError(
                "attention.options.token_ids: global tokens by id are for encoders; use positions (sinks) on a causal decoder."
            )

    def _is_global(self, pos: torch.Tensor, ctx: MaskContext) -> torch.Tensor:
        hit = torch.zeros_like(pos, dtype=torch.bool)
        for p in self.positions:
            hit = hit | (pos == p)
        if self.token_ids:
            if ctx.token_flags is None:
                raise AttentionPatternError(
                    "global_tokens with token_ids needs the input ids; call the model with input_ids, not inputs_embeds."
                )
            shift = ctx.shift[ctx.batch] if ctx.shift is not None else 0
            raw = (pos + shift).clamp(0, ctx.token_flags.shape[1] - 1)
            hit = hit | ctx.token_flags[ctx.batch, raw]
        return hit

    def allowed(self, q, kv, ctx):
        return _causal(q, kv, self._is_global(q, ctx) | self._is_global(kv, ctx), self.causal)

    def band(self):
        return BandStructure(
            left=None, right=None, positions=self.positions, token_ids=self.token_ids, causal=self.causal
        )

    def max_position(self):
        return max(self.positions) if self.positions else None

    def uses_token_ids(self):
        return bool(self.token_ids)


@ATTENTION_PATTERNS.register("sink_window")
@dataclass(frozen=True)
class SinkWindow(Pattern):
    """StreamingLLM for decoders: the first `sinks` positions plus a causal window of `window` positions.

    Args:
        window: Most recent positions seen (including the query's own), > 0.
        sinks: Number of leading positions every query sees (>= 0).
    """

    window: int = 256
    sinks: int = 4
    causal: bool = True
    name: ClassVar[str] = "sink_window"

    def __post_init__(self) -> None:
        _check_int("window", self.window, minimum=1)
        _check_int("sinks", self.sinks, minimum=0)
        if self.causal is not True:
            raise AttentionPatternError(
                "attention.options.causal: sink_window is a causal (decoder) pattern."
            )

    def allowed(self, q, kv, ctx):
        d = q - kv
        return (d >= 0) & ((d < self.window) | (kv < self.sinks))

    def band(self):
        return BandStructure(left=self.window - 1, right=0, positions=tuple(range(self.sinks)), causal=True)


@ATTENTION_PATTERNS.register("dilated_window")
@dataclass(frozen=True)
class DilatedWindow(Pattern):
    """A window with gaps: every `dilation`-th position up to ``window // 2 * dilation`` away (both sides or causal).

    Args:
        window: Positions seen (as for `SlidingWindow`), > 0.
        dilation: Step between seen positions (>= 1).
        causal: Causal or bidirectional.
    """

    window: int = 256
    dilation: int = 2
    causal: bool = False
    name: ClassVar[str] = "dilated_window"

    def __post_init__(self) -> None:
        _check_int("window", self.window, minimum=1)
        _check_int("dilation", self.dilation, minimum=1)

    def allowed(self, q, kv, ctx):
        d = q - kv
        on_grid = torch.remainder(d, self.dilation) == 0
        if self.causal:
            return (d >= 0) & (d < self.window * self.dilation) & on_grid
        reach = (self.window // 2) * self.dilation
        return (d <= reach) & (d >= -reach) & on_grid


@ATTENTION_PATTERNS.register("strided")
@dataclass(frozen=True)
class Strided(Pattern):
    """Sparse Transformer "strided": the last `stride` positions plus every `stride`-th one before.

    Args:
        stride: Local span and step (> 0).
        causal: Causal (default, as in the paper) or the bidirectional analogue.
    """

    stride: int = 128
    causal: bool = True
    name: ClassVar[str] = "strided"

    def __post_init__(self) -> None:
        _check_int("stride", self.stride, minimum=1)

    def allowed(self, q, kv, ctx):
        d = q - kv
        local = (d < self.stride) & (d > -self.stride)
        return _causal(q, kv, local | (torch.remainder(d, self.stride) == 0), self.causal)


@ATTENTION_PATTERNS.register("fixed")
@dataclass(frozen=True)
class Fixed(Pattern):
    """Sparse Transformer "fixed": attend within your block of `block` positions and to the last `summary` of every block.

    Args:
        block: Block length (> 0).
        summary: Summary positions at the end of each block (1 <= summary <= block).
        causal: Causal (default) or bidirectional.
    """

    block: int = 128
    summary: int = 8
    causal: bool = True
    name: ClassVar[str] = "fixed"

    def __post_init__(self) -> None:
        _check_int("block", self.block, minimum=1)
        _check_int("summary", self.summary, minimum=1)
        if self.summary > self.block:
            raise AttentionPatternError(
                f"attention.options.summary ({self.summary}) must be <= block ({self.block})."
            )

    def allowed(self, q, kv, ctx):
        same = torch.div(q, self.block, rounding_mode="floor") == torch.div(
            kv, self.block, rounding_mode="floor"
        )
        summary = torch.remainder(kv, self.block) >= self.block - self.summary
        return _causal(q, kv, same | summary, self.causal)


_HASH_A = 0x9E3779B1
_HASH_B = 0x85EBCA77
_HASH_C = 0xC2B2AE3D


def _block_hash(qb: torch.Tensor, kb: torch.Tensor, seed: int) -> torch.Tensor:
    """A deterministic pseudo-random non-negative int per (query block, key block, seed), < 2**31."""
    h = (qb * _HASH_A + kb * _HASH_B + seed * _HASH_C) & 0x7FFFFFFF
    h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & 0x7FFFFFFF
    h = ((h ^ (h >> 12)) * 0x297A2D39) & 0x7FFFFFFF
    return h ^ (h >> 15)


@ATTENTION_PATTERNS.register("bigbird")
@dataclass(frozen=True)
class BigBird(Pattern):
    """BigBird blocks: a window of blocks, global blocks and seeded random blocks (encoders).

    The sequence is cut into blocks of `block_size`; query block i sees key block j when
    ``|i - j| <= window_blocks // 2``, when i or j is one of the first `global_blocks`, or with probability
    ``random_blocks / random_span`` from a hash of (i, j, seed): the same seed always gives the same mask,
    at every length.

    Args:
        block_size: Positions per block (> 0).
        window_blocks: Blocks in the sliding window (odd, >= 1).
        global_blocks: Leading blocks that are global (>= 0).
        random_blocks: Expected random blocks per query block (>= 0).
        random_span: Key blocks the random draw is spread over (>= random_blocks, > 0).
        seed: Seed of the random blocks.
        causal: Restrict to keys at or before the query.
    """

    block_size: int = 64
    window_blocks: int = 3
    global_blocks: int = 1
    random_blocks: int = 3
    random_span: int = 64
    seed: int = 0
    causal: bool = False
    name: ClassVar[str] = "bigbird"

    def __post_init__(self) -> None:
        _check_int("block_size", self.block_size, minimum=1)
        _check_int("window_blocks", self.window_blocks, minimum=1)
        _check_int("global_blocks", self.global_blocks, minimum=0)
        _check_int("random_blocks", self.random_blocks, minimum=0)
        _check_int("random_span", self.random_span, minimum=max(1, self.random_blocks))
        _check_int("seed", self.seed, minimum=0)

    def allowed(self, q, kv, ctx):
        qb = torch.div(q, self.block_size, rounding_mode="floor")
        kb = torch.div(kv, self.block_size, rounding_mode="floor")
        d = qb - kb
        half = self.window_blocks // 2
        out = (d <= half) & (d >= -half)
        if self.global_blocks:
            out = out | (qb < self.global_blocks) | (kb < self.global_blocks)
        if self.random_blocks:
            draw = torch.remainder(_block_hash(qb, kb, self.seed), self.random_span) < self.random_blocks
            out = out | draw
        return _causal(q, kv, out, self.causal)


@ATTENTION_PATTERNS.register("union")
@dataclass(frozen=True)
class Union(Pattern):
    """A query may attend to a key when any part allows it; e.g. a window plus global tokens.

    Args:
        parts: The patterns (in JSON: ``patterns: [{"pattern": name, "options": {...}}, ...]``).
    """

    parts: tuple[Pattern, ...] = field(default_factory=tuple)
    name: ClassVar[str] = "union"

    @classmethod
    def from_options(cls, options: dict[str, Any] | None = None) -> Union:
        """Build a union from ``{"patterns": [{"pattern": name, "options": {...}} or a Pattern, ...]}``."""
        options = dict(options or {})
        specs = options.pop("patterns", None)
        if options:
            raise AttentionPatternError(
                f"attention.options: union takes only 'patterns', got {sorted(options)}."
            )
        if not isinstance(specs, list | tuple):
            raise AttentionPatternError(
                f"attention.options.patterns must be a list of patterns, got {specs!r}."
            )
        parts = []
        for i, spec in enumerate(specs):
            if isinstance(spec, Pattern):
                parts.append(spec)
                continue
            if not isinstance(spec, dict) or "pattern" not in spec or set(spec) - {"pattern", "options"}:
                raise AttentionPatternError(
                    f"attention.options.patterns[{i}] must be {{'pattern': name, 'options': {{...}}}}, got {spec!r}."
                )
            parts.append(build_pattern(spec["pattern"], spec.get("options")))
        return cls(parts=tuple(parts))

    def __post_init__(self) -> None:
        if len(self.parts) < 1:
            raise AttentionPatternError("attention.options.patterns: a union needs at least one pattern.")

    @property
    def causal(self) -> bool:  # type: ignore[override]
        return all(p.causal for p in self.parts)

    def allowed(self, q, kv, ctx):
        out = self.parts[0].allowed(q, kv, ctx)
        for part in self.parts[1:]:
            out = out | part.allowed(q, kv, ctx)
        return out

    def band(self):
        bands = [p.band() for p in self.parts]
        if any(b is None for b in bands):
            return None
        causal = self.causal
        if len({b.causal for b in bands}) > 1:
            return None
        windows = [b for b in bands if b.has_band]
        if len(windows) > 1:
            return None
        left, right = (windows[0].left, windows[0].right) if windows else (None, None)
        positions = tuple(sorted({p for b in bands for p in b.positions}))
        token_ids = tuple(sorted({t for b in bands for t in b.token_ids}))
        return BandStructure(left=left, right=right, positions=positions, token_ids=token_ids, causal=causal)

    def max_position(self):
        found = [m for m in (p.max_position() for p in self.parts) if m is not None]
        return max(found) if found else None

    def uses_token_ids(self):
        return any(p.uses_token_ids() for p in self.parts)

    def options(self):
        return {"patterns": [p.to_dict() for p in self.parts]}


def build_pattern(name: str, options: dict[str, Any] | None = None) -> Pattern:
    """Build a registered pattern from its name and options (as an `AttentionSparsity` holds them).

    Args:
        name: Registered pattern name (see `sparse_nlp.registry.ATTENTION_PATTERNS`).
        options: The pattern's fields; for ``union``, ``{"patterns": [{"pattern": ..., "options": ...}]}``.

    Raises:
        AttentionPatternError: an unknown pattern or option, or a bad option value (named in the message).
    """
    try:
        cls = ATTENTION_PATTERNS.get(name)
    except RegistryError as err:
        raise AttentionPatternError(f"attention.pattern: {err}") from None
    return cls.from_options(options)


def dense_mask(
    pattern: Pattern,
    q_positions: torch.Tensor,
    kv_positions: torch.Tensor,
    *,
    batch: int = 1,
    shift: torch.Tensor | None = None,
    token_flags: torch.Tensor | None = None,
) -> torch.Tensor:
    """The (B, Lq, Lk) bool mask of a pattern for raw query / key indices (padding not applied).

    Args:
        pattern: The pattern.
        q_positions: (Lq,) raw query indices.
        kv_positions: (Lk,) raw key indices.
        batch: Batch size.
        shift: (B,) left-padding counts (raw index - logical position), or None for none.
        token_flags: (B, T) bool global-token flags by raw index, for token-id patterns.
    """
    device = q_positions.device
    b = torch.arange(batch, device=device).view(batch, 1, 1)
    q = q_positions.view(1, -1, 1)
    kv = kv_positions.view(1, 1, -1)
    if shift is not None:
        s = shift.view(-1, 1, 1)
        q, kv = q - s, kv - s
    ctx = MaskContext(batch=b, shift=shift, token_flags=token_flags)
    out = pattern.allowed(q, kv, ctx)
    return out.expand(batch, q_positions.numel(), kv_positions.numel())


def pattern_names() -> Sequence[str]:
    return ATTENTION_PATTERNS.names()
