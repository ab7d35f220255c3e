"""Imports every built-in pruning method so that each registers itself (one line per method module)."""

from . import methods  # noqa: F401  magnitude
