"""The GLUE task table: every fact about a task in one place (no torch, no datasets: cheap to import).

Reading (`sparse_nlp.evaluation.data`), scoring (`sparse_nlp.evaluation.tasks`), label maps, the CLI's
choices and the model card's model-index (`sparse_nlp.hub`) all derive their views from `GLUE`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EvalSplit:
    """One evaluation split of a task: its local file, its Hub split, and the suffix of its metric keys.

    MNLI has two (matched, mismatched): ``accuracy`` is read from ``dev_matched.tsv`` and
    ``accuracy_mismatched`` from ``dev_mismatched.tsv``.
    """

    file: str = "dev"
    hub: str = "validation"
    suffix: str = ""


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task.

    Attributes:
        name: The task name (``sst2``), also the Hub data set config and the ``glue`` metric config.
        title: As the model card shows it (``GLUE SST-2``).
        folder: The task's folder in the official GLUE download (``SST-2``); also looked for in a data directory.
        task_type: The model-index task type.
        text: Text columns of the local TSV (one, or two for sentence pairs).
        label: The label column of the local TSV.
        label_names: Class names in label-id order (the Hub ``glue`` ids); empty for a regression score.
        string_labels: Whether the local TSV writes the label as its name (``entailment``) rather than its id.
        metrics: The offline metric modules that score the task (`sparse_nlp.evaluation.metrics`).
        main_metric: The metric key reported first and plotted.
        header: Whether the local TSV starts with a header row (CoLA's does not).
        names: Column names for a TSV without a header.
        hub_text: Text columns of the Hub ``glue/<name>`` data set, where they differ from `text`.
        eval_splits: The evaluation splits (one, except MNLI's matched and mismatched).
        skip_labels: Label values that mark a row without a gold label; such rows are dropped with a warning.
    """

    name: str
    title: str
    folder: str
    text: tuple[str, ...]
    label: str = "label"
    label_names: tuple[str, ...] = ()
    string_labels: bool = False
    metrics: tuple[str, ...] = ("accuracy",)
    main_metric: str = "accuracy"
    task_type: str = "text-classification"
    header: bool = True
    names: tuple[str, ...] = ()
    hub_text: tuple[str, ...] = ()
    eval_splits: tuple[EvalSplit, ...] = (EvalSplit(),)
    skip_labels: tuple[str, ...] = field(default=())

    @property
    def num_labels(self) -> int:
        """Classes (1: a regression score)."""
        return len(self.label_names) or 1

    @property
    def regression(self) -> bool:
        """Whether the label is a score (one output) rather than a class."""
        return not self.label_names

    @property
    def evaluable(self) -> bool:
        """Whether sparse_nlp reads and scores this task (its text columns are known)."""
        return bool(self.text)

    @property
    def pair(self) -> bool:
        """Whether the task classifies sentence pairs."""
        return len(self.text) == 2

    @property
    def hub_columns(self) -> tuple[str, ...]:
        """Text columns of the Hub data set."""
        return self.hub_text or self.text

    @property
    def label_ids(self) -> dict[str, int]:
        """Label as written in the local TSV -> label id."""
        if self.string_labels:
            return {name: i for i, name in enumerate(self.label_names)}
        return {str(i): i for i in range(len(self.label_names))}

    @property
    def metric_keys(self) -> tuple[str, ...]:
        """Every key the task's scores are reported under, for every evaluation split (``accuracy_mismatched``)."""
        keys = [k for m in self.metrics for k in METRIC_KEYS[m]]
        return tuple(k + s.suffix for s in self.eval_splits for k in keys)


HUB_DATASET = "nyu-mll/glue"
"""The Hub data set every GLUE task is a config of."""

METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "accuracy": ("accuracy",),
    "f1": ("f1",),
    "matthews_correlation": ("matthews_correlation",),
    "pearson_spearman": ("pearson", "spearmanr"),
}
"""Offline metric module -> the keys it returns."""

_PAIR = ("sentence1", "sentence2")
_NLI = ("entailment", "not_entailment")

GLUE: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask(
            "cola",
            "GLUE CoLA",
            "CoLA",
            text=("sentence",),
            label_names=("unacceptable", "acceptable"),
            metrics=("matthews_correlation",),
            main_metric="matthews_correlation",
            header=False,
            names=("source", "label", "original_label", "sentence"),
        ),
        GlueTask("sst2", "GLUE SST-2", "SST-2", text=("sentence",), label_names=("negative", "positive")),
        GlueTask(
            "mrpc",
            "GLUE MRPC",
            "MRPC",
            text=("#1 String", "#2 String"),
            label="Quality",
            label_names=("not_equivalent", "equivalent"),
            metrics=("f1", "accuracy"),
            main_metric="f1",
            hub_text=_PAIR,
        ),
        GlueTask(
            "stsb",
            "GLUE STS-B",
            "STS-B",
            text=_PAIR,
            label="score",
            metrics=("pearson_spearman",),
            main_metric="spearmanr",
            task_type="sentence-similarity",
        ),
        GlueTask(
            "qqp",
            "GLUE QQP",
            "QQP",
            text=("question1", "question2"),
            label="is_duplicate",
            label_names=("not_duplicate", "duplicate"),
            metrics=("f1", "accuracy"),
            main_metric="f1",
        ),
        GlueTask(
            "mnli",
            "GLUE MNLI",
            "MNLI",
            text=_PAIR,
            label="gold_label",
            label_names=("entailment", "neutral", "contradiction"),
            string_labels=True,
            hub_text=("premise", "hypothesis"),
            eval_splits=(
                EvalSplit("dev_matched", "validation_matched"),
                EvalSplit("dev_mismatched", "validation_mismatched", "_mismatched"),
            ),
            skip_labels=("-",),
        ),
        GlueTask(
            "qnli",
            "GLUE QNLI",
            "QNLI",
            text=("question", "sentence"),
            label_names=_NLI,
            string_labels=True,
        ),
        GlueTask("rte", "GLUE RTE", "RTE", text=_PAIR, label_names=_NLI, string_labels=True),
        GlueTask("wnli", "GLUE WNLI", "WNLI", text=_PAIR, label_names=("not_entailment", "entailment")),
    )
}

EVALUABLE: list[str] = [name for name, task in GLUE.items() if task.evaluable]
"""The tasks sparse_nlp reads and scores (the choices of ``sparse-nlp evaluate --task``)."""


def glue_task(name: str) -> GlueTask:
    """The table's entry for a GLUE task name (``ValueError`` naming the known ones when unknown)."""
    if name not in GLUE:
        raise ValueError(f"unknown GLUE task {name!r}; known: {', '.join(GLUE)}.")
    return GLUE[name]
