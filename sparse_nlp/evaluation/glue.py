"""The GLUE task table: every fact about a task in one place (no torch, no datasets: cheap to import).

Reading (`sparse_nlp.evaluation.data`), scoring (`sparse_nlp.evaluation.tasks`), the CLI's choices and the
model card's model-index (`sparse_nlp.hub`) all derive their views from `GLUE`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task.

    Attributes:
        name: The task name (``sst2``), also the Hub data set config and the ``glue`` metric config.
        title: As the model card shows it (``GLUE SST-2``).
        task_type: The model-index task type.
        text: Text columns (one, or two for sentence pairs); empty for a task sparse_nlp cannot read yet.
        label: The label column.
        num_labels: Classes (1: a regression score).
        main_metric: The metric reported first and plotted.
        read: Extra options for reading the local TSV (``header``, ``names``, ``label_ids`` for string labels).
    """

    name: str
    title: str
    task_type: str = "text-classification"
    text: tuple[str, ...] = ()
    label: str = "label"
    num_labels: int = 2
    main_metric: str = "accuracy"
    read: dict[str, Any] = field(default_factory=dict)

    @property
    def regression(self) -> bool:
        """Whether the label is a score (one output) rather than a class."""
        return self.num_labels == 1

    @property
    def evaluable(self) -> bool:
        """Whether sparse_nlp reads and scores this task (its text columns are known)."""
        return bool(self.text)


HUB_DATASET = "nyu-mll/glue"
"""The Hub data set every GLUE task is a config of."""

GLUE: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("sst2", "GLUE SST-2", text=("sentence",)),
        GlueTask(
            "cola",
            "GLUE CoLA",
            text=("sentence",),
            main_metric="matthews_correlation",
            read={"header": None, "names": ("source", "label", "original_label", "sentence")},
        ),
        GlueTask(
            "rte",
            "GLUE RTE",
            text=("sentence1", "sentence2"),
            read={"label_ids": {"entailment": 0, "not_entailment": 1}},
        ),
        GlueTask(
            "stsb",
            "GLUE STS-B",
            "sentence-similarity",
            text=("sentence1", "sentence2"),
            label="score",
            num_labels=1,
            main_metric="spearmanr",
        ),
        GlueTask("mrpc", "GLUE MRPC"),
        GlueTask("qnli", "GLUE QNLI"),
        GlueTask("mnli", "GLUE MNLI"),
    )
}

EVALUABLE: list[str] = [name for name, task in GLUE.items() if task.evaluable]
"""The tasks sparse_nlp reads and scores (the choices of ``sparse-nlp evaluate --task``)."""
