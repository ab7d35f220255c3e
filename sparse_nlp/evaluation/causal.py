"""Causal-LM text tasks for recipes: a decoder with its tokenizer, training windows cut from a corpus, and the
perplexity of an evaluate stage with its protocol recorded.

A text task is a corpus name (``wikitext2``, ``tinyshakespeare``) or a ``.txt`` file (see
`sparse_nlp.evaluation.corpora.is_text_task`). Training reads the corpus split calibration reads
(`sparse_nlp.pruning.calibration.WINDOW_SPLITS`: WikiText-2's *valid* split, never its test split, which
perplexity scores; Tiny Shakespeare's only split; a ``.txt`` file whole), tokenized once without special tokens
and cut into consecutive, non-overlapping windows of ``max_length`` tokens (as transformers' ``run_clm.py``
groups texts); the labels are the inputs (the model shifts them).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataError, UnsupportedModelError
from ..models import load_model
from ..pruning.calibration import WINDOW_SPLITS, corpus_text
from ..targets import model_targets
from .corpora import PERPLEXITY_TASKS
from .perplexity import evaluate_perplexity, perplexity_text

DEFAULT_CONTEXT = 1024
"""Perplexity window of an evaluate stage when the recipe sets none (capped at the model's positions)."""


def load_causal_lm(
    name: str | os.PathLike, task: str, *, trust_remote_code: bool = False
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a causal decoder for the text task `task`.

    Raises:
        UnsupportedModelError: The model is not a causal decoder of the targets table (an encoder cannot be
            trained on a text corpus by next-token prediction).
        FileNotFoundError: The model folder has no tokenizer.
    """
    model, tokenizer = load_model(name, task="causal-lm", trust_remote_code=trust_remote_code)
    targets = model_targets(model)
    if not targets.causal:
        raise UnsupportedModelError(
            f"task {task!r} is a text corpus for causal decoders; model {str(name)!r} is a "
            f"{model.config.model_type} encoder. Use a decoder (gpt2, llama, mistral, qwen2, ... or smollm2) "
            "or a GLUE task."
        )
    if tokenizer is None:
        raise FileNotFoundError(f"model {str(name)!r} has no tokenizer files; save the tokenizer beside it.")
    return model, tokenizer


def training_split(task: str) -> str:
    """Where the training windows of a text task come from (for results and error messages)."""
    if task in WINDOW_SPLITS:
        return f"{task} {WINDOW_SPLITS[task]}"
    return os.path.basename(task)


def text_windows(
    tokenizer: Any,
    task: str,
    *,
    max_length: int,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
) -> list[dict[str, list[int]]]:
    """Training rows of a text task: consecutive windows of `max_length` tokens, ``labels`` = ``input_ids``.

    Args:
        tokenizer: The decoder's tokenizer.
        task: A corpus name or a ``.txt`` path.
        max_length: Tokens per window; the tail shorter than a window is dropped.
        data_dir: Local data directory (default ``$SPARSE_NLP_DATA_DIR``, then the Hub).
        limit: Keep only the first `limit` windows.

    Raises:
        DataError: The text is shorter than one window.
    """
    text = corpus_text(task, data_dir)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    count = len(ids) // max_length
    if count == 0:
        raise DataError(
            f"{training_split(task)} has {len(ids)} tokens, fewer than one training window of max_length "
            f"{max_length}; lower max_length or use a longer text."
        )
    if limit is not None:
        count = min(count, limit)
    rows = []
    for i in range(count):
        window = ids[i * max_length : (i + 1) * max_length]
        rows.append({"input_ids": window, "labels": list(window)})
    return rows


def check_eval_split(task: str, split: str | None, data_dir: str | os.PathLike | None = None) -> None:
    """Read the evaluation text once, so a missing file or a bad split fails before any training."""
    if split is not None and task not in PERPLEXITY_TASKS:
        raise ConfigError(f"split {split!r}: a .txt task has one text; leave split out.")
    perplexity_text(task, split=split if task in PERPLEXITY_TASKS else None, data_dir=data_dir)


def evaluate_text(
    model: nn.Module,
    tokenizer: Any,
    task: str,
    *,
    split: str | None = None,
    data_dir: str | os.PathLike | None = None,
    context: int | None = None,
    stride: int | None = None,
    max_windows: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of a causal LM on a text task, with the protocol (corpus, split, file, windows, context,
    stride, scored tokens) beside it; ``main_metric`` is ``perplexity``.

    `context` defaults to `DEFAULT_CONTEXT` tokens, or the model's positions when it has fewer.
    """
    text, source = perplexity_text(task, split=split if task in PERPLEXITY_TASKS else None, data_dir=data_dir)
    if context is None:
        positions = getattr(model.config, "max_position_embeddings", None) or DEFAULT_CONTEXT
        context = min(DEFAULT_CONTEXT, positions)
    with torch.no_grad():
        result = evaluate_perplexity(
            model,
            tokenizer,
            text,
            context=context,
            stride=stride,
            max_windows=max_windows,
            progress=progress,
        )
    return {**source, **result, "main_metric": "perplexity"}
