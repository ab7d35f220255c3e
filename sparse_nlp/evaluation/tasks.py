"""GLUE tasks: tokenization (sentence and sentence pair) and evaluation of a sequence-classification model.

Rows come from `sparse_nlp.evaluation.data.load_glue_rows` (a local data directory of GLUE TSVs, or the Hub
names); metrics come from our offline `evaluate` modules (`sparse_nlp.evaluation.metrics`). Reported values
are percentages (accuracy 88.76, not 0.8876), as in the GLUE leaderboard.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import load_config
from ..models import load_model, resolve_model
from ..registry import suggest
from .data import GLUE_TASKS, load_glue_rows
from .glue import EVALUABLE, GLUE
from .metrics import load_metric

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskInfo:
    """What a GLUE task needs from a model and how it is scored."""

    name: str
    num_labels: int
    regression: bool
    main_metric: str  # the key reported first and plotted


TASKS: dict[str, TaskInfo] = {
    name: TaskInfo(name, GLUE[name].num_labels, GLUE[name].regression, GLUE[name].main_metric)
    for name in EVALUABLE
}


def task_info(task: str) -> TaskInfo:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}.{suggest(task, list(TASKS))} Known: {', '.join(TASKS)}.")
    return TASKS[task]


def load_for_task(
    name: str | os.PathLike, task: str, *, trust_remote_code: bool = False
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) with a classification (or 1-output regression) head sized for a GLUE task.

    A model fine-tuned on the task keeps its head; a base model (e.g. ``minilm``) gets a new one.
    """
    info = task_info(task)
    path = resolve_model(name)
    config = load_config(path, num_labels=info.num_labels, trust_remote_code=trust_remote_code)
    if info.regression:
        config.problem_type = "regression"
    model, tokenizer = load_model(
        path, task="sequence-classification", config=config, trust_remote_code=trust_remote_code
    )
    if tokenizer is None:
        raise FileNotFoundError(f"model {str(name)!r} has no tokenizer files; save the tokenizer beside it.")
    return model, tokenizer


def encode_glue(
    tokenizer: Any,
    task: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    max_length: int = 128,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """A GLUE split as a list of tokenized features with ``labels`` (pad them with ``DataCollatorWithPadding``).

    Args:
        tokenizer: The model's tokenizer.
        task: ``sst2``, ``cola``, ``rte`` or ``stsb``.
        split: ``train`` or ``dev``.
        data_dir: Local GLUE data directory (default ``$SPARSE_NLP_DATA_DIR``, then the Hub).
        max_length: Truncation length in tokens.
        limit: Keep only the first `limit` rows.
    """
    task_info(task)
    rows = load_glue_rows(task, split, data_dir)
    n = len(rows["label"]) if limit is None else min(limit, len(rows["label"]))
    texts = rows["text"][:n]
    pairs = rows["text_pair"][:n] if rows["text_pair"] is not None else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    return [{**{k: enc[k][i] for k in enc}, "labels": rows["label"][i]} for i in range(n)]


def compute_task_metrics(task: str, predictions, references) -> dict[str, float]:
    """The task's GLUE metrics (from the offline ``glue`` module), in percent."""
    values = load_metric("glue", task).compute(predictions=list(predictions), references=list(references))
    return {k: round(100.0 * float(v), 2) for k, v in values.items()}


@torch.no_grad()
def predict(
    model: nn.Module,
    features: list[dict[str, Any]],
    tokenizer: Any,
    *,
    batch_size: int = 64,
    progress: bool = True,
) -> torch.Tensor:
    """Logits of a sequence-classification model over tokenized features, (N, num_labels)."""
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in tqdm(
        range(0, len(features), batch_size), desc="evaluate", unit="batch", disable=not progress
    ):
        batch = collate(
            [{k: v for k, v in f.items() if k != "labels"} for f in features[start : start + batch_size]]
        )
        out.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def evaluate_glue(
    model: nn.Module,
    tokenizer: Any,
    task: str,
    *,
    data_dir: str | os.PathLike | None = None,
    split: str = "dev",
    max_length: int = 128,
    batch_size: int = 64,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score a sequence-classification model on a GLUE split.

    Returns:
        ``{"task", "split", "num_examples", <metric>: percent, ...}``; ``main_metric`` names the headline key.

    Raises:
        DataError: the data directory lacks the task's files (the message lists the paths looked for).
    """
    info = task_info(task)
    features = encode_glue(tokenizer, task, split, data_dir=data_dir, max_length=max_length, limit=limit)
    logits = predict(model, features, tokenizer, batch_size=batch_size, progress=progress)  # (N, C)
    labels = [f["labels"] for f in features]
    if info.regression:
        predictions = logits[:, 0].tolist()
    else:
        if logits.shape[-1] != info.num_labels:
            raise ValueError(f"model has {logits.shape[-1]} outputs but {task} has {info.num_labels} labels.")
        predictions = logits.argmax(-1).tolist()
    result: dict[str, Any] = {"task": task, "split": split, "num_examples": len(labels)}
    result.update(compute_task_metrics(task, predictions, labels))
    result["main_metric"] = info.main_metric
    return result


__all__ = [
    "GLUE_TASKS",
    "TASKS",
    "TaskInfo",
    "compute_task_metrics",
    "encode_glue",
    "evaluate_glue",
    "load_for_task",
    "predict",
    "task_info",
]
