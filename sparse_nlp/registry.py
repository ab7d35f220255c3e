"""Name -> class tables for sparsity methods, attention patterns and kernels.

Everything a config or recipe names is looked up here and nowhere else: a name in a config.json can
only select something that our package registered, never cause an import.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import RegistryError

T = TypeVar("T")


def suggest(name: str, choices: list[str]) -> str:
    """A ' Did you mean X?' suffix for error messages, or '' when nothing is close."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


class Registry(Generic[T]):
    """A table from names to registered objects (classes or functions).

    Args:
        kind: What the table holds, used in error messages (e.g. "pruning method").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers an object under `name`; registering a name twice is an error."""

        def wrap(obj: T) -> T:
            if name in self._items:
                raise RegistryError(f"{self.kind} {name!r} is already registered (by {self._items[name]!r}).")
            self._items[name] = obj
            return obj

        return wrap

    def get(self, name: str) -> T:
        """Look up `name`; an unknown name raises with the known names and the closest match."""
        try:
            return self._items[name]
        except KeyError:
            known = sorted(self._items)
            raise RegistryError(
                f"unknown {self.kind} {name!r}.{suggest(name, known)} Known: {', '.join(known) or 'none'}."
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


# Weight (neuron-to-neuron) pruning methods: sparse_nlp.pruning.methods.PruningMethod subclasses.
PRUNING_METHODS: Registry = Registry("pruning method")
# Attention (token-to-token) patterns: mask-function factories.
ATTENTION_PATTERNS: Registry = Registry("attention pattern")
# Attention kernels: functions with transformers' attention-interface signature.
ATTENTION_KERNELS: Registry = Registry("attention kernel")
# Structured (whole unit) importance scores.
STRUCTURED_SCORES: Registry = Registry("structured importance score")
