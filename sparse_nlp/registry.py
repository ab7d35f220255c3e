"""Name -> class tables for sparsity methods, attention patterns, kernels and structured scores.

Everything a config or recipe names is looked up here and nowhere else: a name in a config.json can
only select something that our package registered, never cause an import of a module it names. Each table
is the only list of its names: configs validate against it, so a newly registered entry passes validation.

A table knows the modules of this package that fill it (``filled_by``) and imports them on its first
lookup, so this module (and `sparse_nlp.config`, which validates names through it) imports no
implementation, and ``import sparse_nlp`` stays light.
"""

from __future__ import annotations

import difflib
import importlib
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
        filled_by: Modules of this package whose import registers the built-in entries; imported on the
            first lookup (a deliberate lazy import: they pull in torch).
    """

    def __init__(self, kind: str, filled_by: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.filled_by = filled_by
        self._items: dict[str, T] = {}
        self._filled = not filled_by

    def _fill(self) -> None:
        if not self._filled:
            self._filled = True
            for module in self.filled_by:
                importlib.import_module(module)

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
        self._fill()
        try:
            return self._items[name]
        except KeyError:
            known = sorted(self._items)
            raise RegistryError(
                f"unknown {self.kind} {name!r}.{suggest(name, known)} Known: {', '.join(known) or 'none'}."
            ) from None

    def names(self) -> list[str]:
        """The registered names, sorted."""
        self._fill()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._fill()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


# Weight (neuron-to-neuron) pruning methods: sparse_nlp.pruning.methods.PruningMethod subclasses.
PRUNING_METHODS: Registry = Registry("pruning method", filled_by=("sparse_nlp.pruning.builtin",))
# Attention (token-to-token) patterns: mask-function factories.
ATTENTION_PATTERNS: Registry = Registry("attention pattern", filled_by=("sparse_nlp.attention.patterns",))
# Attention kernels: functions with transformers' attention-interface signature.
ATTENTION_KERNELS: Registry = Registry("attention kernel", filled_by=("sparse_nlp.attention.kernels",))
# Structured (whole unit) importance scores.
STRUCTURED_SCORES: Registry = Registry(
    "structured importance score", filled_by=("sparse_nlp.structured.scores",)
)
# Dynamic activation sparsity methods: sparse_nlp.activation.methods.ActivationMethod subclasses.
ACTIVATION_METHODS: Registry = Registry(
    "activation sparsity method", filled_by=("sparse_nlp.activation.methods",)
)
