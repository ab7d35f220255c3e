"""Weight sparsity patterns as typed values, parsed once from strings.

Accepted forms: ``"unstructured"``, ``"N:M"`` (keep at most N of every M consecutive weights along the
input dimension, 0 < N < M), and ``"block:RxC"`` (whole R x C blocks of the (out, in) weight are kept or
removed, R, C >= 1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import PatternError

ACCEPTED_FORMS = (
    '"unstructured", "N:M" with 0 < N < M (e.g. "2:4", "4:8"), "block:RxC" with R, C >= 1 (e.g. "block:4x4")'
)


@dataclass(frozen=True)
class Unstructured:
    """Any individual weight may be removed."""

    def __str__(self) -> str:
        return "unstructured"


@dataclass(frozen=True)
class NM:
    """At most `n` nonzeros in every group of `m` consecutive inputs (2:4 is the GPU sparse-tensor-core form).

    The sparsity of an N:M pattern is fixed at 1 - n/m.
    """

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise PatternError(
                f"invalid N:M pattern {self.n}:{self.m}: need 0 < N < M. Accepted forms: {ACCEPTED_FORMS}."
            )

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


@dataclass(frozen=True)
class Block:
    """Whole `rows` x `cols` blocks of the (out_features, in_features) weight are kept or removed."""

    rows: int
    cols: int

    def __post_init__(self) -> None:
        if not (
            isinstance(self.rows, int) and isinstance(self.cols, int) and self.rows >= 1 and self.cols >= 1
        ):
            raise PatternError(
                f"invalid block pattern block:{self.rows}x{self.cols}: both sides must be >= 1. "
                f"Accepted forms: {ACCEPTED_FORMS}."
            )

    def __str__(self) -> str:
        return f"block:{self.rows}x{self.cols}"


Pattern = Unstructured | NM | Block

_NM_RE = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*$")
_BLOCK_RE = re.compile(r"^\s*block\s*:\s*(-?\d+)\s*x\s*(-?\d+)\s*$", re.IGNORECASE)


def parse_pattern(value: str | Pattern) -> Pattern:
    """Parse ``"unstructured"``, ``"2:4"`` or ``"block:4x4"`` into a typed pattern.

    Args:
        value: The pattern string (or an already typed pattern, returned unchanged).

    Raises:
        PatternError: for anything else, with the accepted forms in the message.
    """
    if isinstance(value, Unstructured | NM | Block):
        return value
    if not isinstance(value, str):
        raise PatternError(
            f"pattern must be a string, got {type(value).__name__} {value!r}. Accepted forms: {ACCEPTED_FORMS}."
        )
    text = value.strip()
    if text.lower() == "unstructured":
        return Unstructured()
    if m := _NM_RE.match(text):
        return NM(int(m.group(1)), int(m.group(2)))
    if m := _BLOCK_RE.match(text):
        return Block(int(m.group(1)), int(m.group(2)))
    raise PatternError(f"unknown pattern {value!r}. Accepted forms: {ACCEPTED_FORMS}.")
