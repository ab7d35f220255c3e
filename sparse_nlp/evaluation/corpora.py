"""The text corpora that ``sparse-nlp evaluate`` scores by perplexity (no heavy imports: the CLI's help reads it)."""

from __future__ import annotations

PERPLEXITY_TASKS = {"wikitext2": "test", "tinyshakespeare": "train"}
"""Corpus name -> default split for ``sparse-nlp evaluate --task``; any ``.txt`` path works too."""


def is_text_task(task: object) -> bool:
    """True for a text-corpus task (a causal-LM task scored by perplexity): a name of `PERPLEXITY_TASKS` or a
    ``.txt`` path; everything else is a labelled task (GLUE or a data set description)."""
    return isinstance(task, str) and (task in PERPLEXITY_TASKS or task.endswith(".txt"))
