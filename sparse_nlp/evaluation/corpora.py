"""The text corpora that ``sparse-nlp evaluate`` scores by perplexity (no heavy imports: the CLI's help reads it)."""

from __future__ import annotations

PERPLEXITY_TASKS = {"wikitext2": "test", "tinyshakespeare": "train"}
"""Corpus name -> default split for ``sparse-nlp evaluate --task``; any ``.txt`` path works too."""
