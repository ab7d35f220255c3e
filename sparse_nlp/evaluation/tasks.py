"""Tasks: tokenization (sentence and sentence pair) and evaluation of a sequence-classification model.

A task is a GLUE name (`sparse_nlp.evaluation.glue.GLUE`; rows from `sparse_nlp.evaluation.data.load_glue_rows`,
a local data directory of GLUE TSVs or the Hub) or a `TaskSpec` describing your own data
(`sparse_nlp.evaluation.custom`). Metrics come from our offline `evaluate` modules
(`sparse_nlp.evaluation.metrics`), as the task lists them. Reported values are percentages (accuracy 88.76,
not 0.8876), as in the GLUE leaderboard.
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
from .custom import TaskSpec, label_names, load_custom_rows
from .data import GLUE_TASKS, load_glue_rows
from .glue import EVALUABLE, GLUE, EvalSplit, GlueTask
from .metrics import load_metric

logger = logging.getLogger(__name__)


Task = str | TaskSpec
"""A GLUE task name or a description of your own data."""


@dataclass(frozen=True)
class TaskInfo:
    """What a task needs from a model and how it is scored."""

    name: str
    num_labels: int
    regression: bool
    main_metric: str  # the key reported first and plotted
    metrics: tuple[str, ...] = ("accuracy",)  # offline metric modules
    label_names: tuple[str, ...] = ()  # class names in id order (empty: regression)
    eval_splits: tuple[EvalSplit, ...] = (EvalSplit(),)


def _glue_info(t: GlueTask) -> TaskInfo:
    return TaskInfo(
        t.name, t.num_labels, t.regression, t.main_metric, t.metrics, t.label_names, t.eval_splits
    )


TASKS: dict[str, TaskInfo] = {name: _glue_info(GLUE[name]) for name in EVALUABLE}


def task_info(task: Task) -> TaskInfo:
    """The `TaskInfo` of a GLUE name or a `TaskSpec` (whose labels may be read from its train split)."""
    if isinstance(task, TaskSpec):
        names = label_names(task)
        return TaskInfo(
            task.name,
            len(names) or 1,
            task.regression,
            task.main_metric,
            task.metric_modules,
            names,
            task.eval_splits,
        )
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}.{suggest(task, list(TASKS))} Known: {', '.join(TASKS)}.")
    return TASKS[task]


def task_name(task: Task) -> str:
    """The name results and file names use."""
    return task.name if isinstance(task, TaskSpec) else task


def load_rows(task: Task, split: str, data_dir: str | os.PathLike | None = None) -> dict[str, list]:
    """A split of any task as ``{"text", "text_pair" (or None), "label"}`` (see `load_glue_rows`)."""
    if isinstance(task, TaskSpec):
        return load_custom_rows(task, split)
    return load_glue_rows(task, split, data_dir)


def load_for_task(
    name: str | os.PathLike, task: Task, *, trust_remote_code: bool = False
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) with a classification (or 1-output regression) head sized for a task.

    A model fine-tuned on the task keeps its head; a base model (e.g. ``minilm``) gets a new one, whose
    ``id2label`` / ``label2id`` are the task's class names.
    """
    info = task_info(task)
    path = resolve_model(name)
    config = load_config(path, num_labels=info.num_labels, trust_remote_code=trust_remote_code)
    if info.regression:
        config.problem_type = "regression"
    elif info.label_names and config.id2label == {i: f"LABEL_{i}" for i in range(info.num_labels)}:
        config.id2label = dict(enumerate(info.label_names))
        config.label2id = {label: i for i, label in enumerate(info.label_names)}
    model, tokenizer = load_model(
        path, task="sequence-classification", config=config, trust_remote_code=trust_remote_code
    )
    if tokenizer is None:
        raise FileNotFoundError(f"model {str(name)!r} has no tokenizer files; save the tokenizer beside it.")
    return model, tokenizer


def encode_glue(
    tokenizer: Any,
    task: Task,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    max_length: int = 128,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """A task's split as a list of tokenized features with ``labels`` (pad them with ``DataCollatorWithPadding``).

    Args:
        tokenizer: The model's tokenizer.
        task: A GLUE task name (``sst2``, ``mrpc``, ...) or a `TaskSpec`.
        split: ``train`` or ``dev`` (MNLI also ``dev_mismatched``).
        data_dir: Local GLUE data directory (default ``$SPARSE_NLP_DATA_DIR``, then the Hub).
        max_length: Truncation length in tokens.
        limit: Keep only the first `limit` rows.
    """
    task_info(task)
    rows = load_rows(task, split, data_dir)
    n = len(rows["label"]) if limit is None else min(limit, len(rows["label"]))
    texts = rows["text"][:n]
    pairs = rows["text_pair"][:n] if rows["text_pair"] is not None else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    return [{**{k: enc[k][i] for k in enc}, "labels": rows["label"][i]} for i in range(n)]


def compute_task_metrics(task: Task, predictions, references) -> dict[str, float]:
    """The task's metrics (its offline metric modules, e.g. F1 and accuracy for MRPC), in percent.

    F1 over more than two classes is the macro average.
    """
    info = task_info(task)
    values: dict[str, float] = {}
    for name in info.metrics:
        options = {"average": "macro"} if name == "f1" and info.num_labels > 2 else {}
        values.update(
            load_metric(name).compute(predictions=list(predictions), references=list(references), **options)
        )
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
    task: Task,
    *,
    data_dir: str | os.PathLike | None = None,
    split: str = "dev",
    max_length: int = 128,
    batch_size: int = 64,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score a sequence-classification model on a task's split.

    ``dev`` scores every evaluation split of the task: MNLI's matched (``accuracy``) and mismatched
    (``accuracy_mismatched``, ``num_examples_mismatched``) dev sets.

    Returns:
        ``{"task", "split", "num_examples", <metric>: percent, ...}``; ``main_metric`` names the headline key.

    Raises:
        DataError: the data directory lacks the task's files (the message lists the paths looked for).
    """
    info = task_info(task)
    splits = (
        info.eval_splits
        if split in ("dev", "validation")
        else tuple(s for s in info.eval_splits if s.file == split) or (EvalSplit(split, split, ""),)
    )
    result: dict[str, Any] = {"task": info.name, "split": split}
    for s in splits:
        features = encode_glue(
            tokenizer,
            task,
            s.file if len(splits) > 1 else split,
            data_dir=data_dir,
            max_length=max_length,
            limit=limit,
        )
        logits = predict(model, features, tokenizer, batch_size=batch_size, progress=progress)  # (N, C)
        labels = [f["labels"] for f in features]
        if info.regression:
            predictions = logits[:, 0].tolist()
        else:
            if logits.shape[-1] != info.num_labels:
                raise ValueError(
                    f"model has {logits.shape[-1]} outputs but {info.name} has {info.num_labels} labels."
                )
            predictions = logits.argmax(-1).tolist()
        result["num_examples" + s.suffix] = len(labels)
        result.update({k + s.suffix: v for k, v in compute_task_metrics(task, predictions, labels).items()})
    result["main_metric"] = info.main_metric
    if isinstance(task, TaskSpec) and task.dataset:
        result.update(dataset=task.dataset, **({"dataset_config": task.config} if task.config else {}))
    return result


__all__ = [
    "GLUE_TASKS",
    "TASKS",
    "Task",
    "TaskInfo",
    "TaskSpec",
    "compute_task_metrics",
    "encode_glue",
    "evaluate_glue",
    "load_for_task",
    "load_rows",
    "predict",
    "task_info",
    "task_name",
]
