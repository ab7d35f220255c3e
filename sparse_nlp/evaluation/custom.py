"""Your own data as a task: a description (kind, files or a Hub data set, columns, labels, metrics) in place of
a GLUE task name, in a recipe's ``task`` or a ``sparse-nlp evaluate --task FILE.yaml`` file.

A description::

    name: reviews                    # used in results and file names (default: custom)
    kind: classification             # classification | pair-classification | regression
    data_files: {train: data/train.csv, dev: data/dev.csv}   # .csv .tsv .json .jsonl .parquet
    # or: dataset: imdb, config: null, splits: {train: train, dev: test}
    text: [review]                   # two columns for pair-classification
    label: stars
    labels: [bad, good]              # optional: the label ids in order; default: the sorted values of train
    metrics: [accuracy, f1]          # offline metric modules; default accuracy (pearson_spearman: regression)

Files are read with `datasets` (its ``csv``, ``json`` and ``parquet`` builders); relative paths are relative to
the working directory. Every problem (a missing column, a label outside the label list, a regression task
with text labels) is a `DataError` raised while the data are read, before any training.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import _build
from ..errors import ConfigError, DataError
from ..registry import suggest
from .data import _hub_dataset
from .glue import METRIC_KEYS, EvalSplit

KINDS = ("classification", "pair-classification", "regression")
FILE_TYPES: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
"""File suffix -> (`datasets` builder, its options)."""
CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews_correlation")
REGRESSION_METRICS = ("pearson_spearman",)
SPLIT_NAMES = ("train", "dev")
_DEFAULT_HUB_SPLITS = {"train": "train", "dev": "validation"}


@dataclass
class TaskSpec:
    """A task described by its data rather than named (see the module docstring for the YAML form).

    Attributes:
        name: Names the task in results, model cards and ``eval_<name>.json``.
        kind: ``classification`` (one text column), ``pair-classification`` (two) or ``regression`` (one or
            two text columns, a numeric label, one output).
        data_files: Split (``train``, ``dev``) -> a local file (.csv, .tsv, .json, .jsonl, .parquet).
        dataset: A Hub data set name instead of files, with its `config` and `splits`.
        config: The Hub data set's config name.
        splits: Split (``train``, ``dev``) -> the Hub split name (default ``train`` and ``validation``).
        text: The text column(s).
        label: The label column.
        labels: The class labels in id order; default: the sorted distinct values of the train split (written
            back here once read, so a saved recipe keeps the order).
        metrics: Offline metric modules: ``accuracy``, ``f1`` (macro over more than two classes),
            ``matthews_correlation``; ``pearson_spearman`` for regression. Default: accuracy or
            pearson_spearman.
    """

    kind: str
    text: list[str]
    label: str = "label"
    name: str = "custom"
    data_files: dict[str, str] | None = None
    dataset: str | None = None
    config: str | None = None
    splits: dict[str, str] | None = None
    labels: list[Any] | None = None
    metrics: list[str] | None = None

    def validate(self, path: str = "task") -> TaskSpec:
        """Check the description (not the data); errors name the field under `path`."""
        if self.kind not in KINDS:
            raise ConfigError(
                f"{path}.kind must be one of {', '.join(KINDS)}, got {self.kind!r}.{suggest(str(self.kind), list(KINDS))}"
            )
        if not isinstance(self.name, str) or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(
                f"{path}.name must be letters, digits, - and _ (a file name part), got {self.name!r}."
            )
        want = 2 if self.kind == "pair-classification" else (1, 2) if self.kind == "regression" else 1
        if len(self.text) not in ((want,) if isinstance(want, int) else want) or not all(
            isinstance(c, str) and c for c in self.text
        ):
            raise ConfigError(
                f"{path}.text: a {self.kind} task reads {'two' if want == 2 else 'one' if want == 1 else 'one or two'} "
                f"text column(s), got {self.text!r}."
            )
        if (self.data_files is None) == (self.dataset is None):
            raise ConfigError(
                f"{path}: give either data_files (local files) or dataset (a Hub name), not both."
            )
        if self.data_files is not None:
            self._validate_files(path)
        if self.splits is not None:
            unknown = [k for k in self.splits if k not in SPLIT_NAMES]
            if unknown:
                raise ConfigError(f"{path}.splits: unknown split(s) {unknown}; use {', '.join(SPLIT_NAMES)}.")
        if self.labels is not None:
            if self.regression:
                raise ConfigError(f"{path}.labels has no meaning for a regression task; remove it.")
            names = [_label_key(v) for v in self.labels]
            if len(names) < 2 or len(set(names)) != len(names):
                raise ConfigError(
                    f"{path}.labels must list at least two distinct labels, got {self.labels!r}."
                )
        allowed = REGRESSION_METRICS if self.regression else CLASSIFICATION_METRICS
        for metric in self.metrics or []:
            if metric not in allowed:
                raise ConfigError(
                    f"{path}.metrics: {metric!r} does not score a {self.kind} task; use {', '.join(allowed)}."
                    f"{suggest(str(metric), list(allowed))}"
                )
        return self

    def _validate_files(self, path: str) -> None:
        unknown = [k for k in self.data_files if k not in (*SPLIT_NAMES, "validation")]
        if unknown:
            raise ConfigError(f"{path}.data_files: unknown split(s) {unknown}; use {', '.join(SPLIT_NAMES)}.")
        for split, file in self.data_files.items():
            if not isinstance(file, str) or Path(file).suffix.lower() not in FILE_TYPES:
                raise ConfigError(
                    f"{path}.data_files.{split}: {file!r} is not a file type this reads "
                    f"({', '.join(FILE_TYPES)})."
                )

    @property
    def regression(self) -> bool:
        """Whether the label is a score (one output)."""
        return self.kind == "regression"

    @property
    def pair(self) -> bool:
        """Whether the task reads two text columns."""
        return len(self.text) == 2

    @property
    def metric_modules(self) -> tuple[str, ...]:
        """The metric modules that score the task (the defaults when none are given)."""
        return tuple(self.metrics or (REGRESSION_METRICS if self.regression else ("accuracy",)))

    @property
    def main_metric(self) -> str:
        """The key reported first: the first key of the first metric."""
        return METRIC_KEYS[self.metric_modules[0]][-1 if self.regression else 0]

    @property
    def eval_splits(self) -> tuple[EvalSplit, ...]:
        """One evaluation split, ``dev``."""
        return (EvalSplit("dev", self._hub_split("dev")),)

    def _hub_split(self, split: str) -> str:
        return {**_DEFAULT_HUB_SPLITS, **(self.splits or {})}[split]

    @classmethod
    def from_dict(cls, data: Any, path: str = "task") -> TaskSpec:
        """Build and validate a description from a mapping (errors name the field under `path`)."""
        return _build(cls, data, path).validate(path)

    def to_dict(self) -> dict[str, Any]:
        """The description without its unset fields."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


def load_task_file(path: str | os.PathLike) -> TaskSpec:
    """A task description from a YAML (or JSON) file; errors name the file and the field."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task description {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a valid YAML / JSON task description: {err}") from None
    try:
        return TaskSpec.from_dict(data, "task")
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def _read_split(spec: TaskSpec, split: str) -> tuple[Any, str]:
    """(`datasets.Dataset`, where it came from) of a split."""
    import datasets

    if spec.data_files is not None:
        files = spec.data_files
        key = split if split in files else "validation" if split == "dev" and "validation" in files else None
        if key is None:
            raise DataError(
                f"task {spec.name!r} has no {split} file: data_files lists {', '.join(files)}; add "
                f"data_files.{split}."
            )
        file = Path(files[key]).expanduser()
        if not file.is_file():
            raise DataError(
                f"task {spec.name!r}: data_files.{key} {str(file)!r} does not exist (relative paths are "
                f"relative to the working directory, {os.getcwd()})."
            )
        builder, options = FILE_TYPES[file.suffix.lower()]
        try:
            ds = datasets.load_dataset(builder, data_files={"split": str(file)}, split="split", **options)
        except Exception as err:  # the builders raise many types for a malformed file
            raise DataError(f"cannot read {file} as {builder}: {str(err).splitlines()[0][:300]}") from None
        return ds, str(file)
    hub_split = spec._hub_split(split)
    what = f"{spec.dataset}{'/' + spec.config if spec.config else ''} split {hub_split}"
    hint = f"task {spec.name!r} names the Hub data set {spec.dataset!r}; to read local files, give data_files"
    ds = _hub_dataset(what, "", spec.dataset, spec.config, split=hub_split, hint=hint)
    return ds, what


def _label_key(value: Any) -> str:
    """A label value as the label list compares it (``1``, ``1.0`` and ``"1"`` are the same label)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def infer_labels(values: list[Any]) -> list[str]:
    """The distinct label values, numbers in numeric order, else in text order."""
    keys = sorted({_label_key(v) for v in values if v is not None})
    try:
        return sorted(keys, key=float)
    except ValueError:
        return keys


def load_custom_rows(spec: TaskSpec, split: str) -> dict[str, list]:
    """A split of a described task as ``{"text", "text_pair" (or None), "label"}`` (label ids or floats).

    A classification task without ``labels`` takes them from the train split (and keeps them in `spec`).

    Raises:
        DataError: a missing split, file or column (the message lists the columns that exist), an empty or
            missing label, a label outside ``labels``, or a regression label that is not a number.
    """
    split = "dev" if split == "validation" else split
    if split not in SPLIT_NAMES:
        raise DataError(f"task {spec.name!r} has splits {', '.join(SPLIT_NAMES)}, not {split!r}.")
    ds, where = _read_split(spec, split)
    columns = list(ds.column_names)
    missing = [c for c in (*spec.text, spec.label) if c not in columns]
    if missing:
        which = " and ".join(f"{'label' if c == spec.label else 'text'} column {c!r}" for c in missing)
        raise DataError(f"{where}: no {which}; the columns are {', '.join(map(repr, columns))}.")
    raw = list(ds[spec.label])
    if any(v is None or (isinstance(v, float) and math.isnan(v)) or v == "" for v in raw):
        row = next(
            i for i, v in enumerate(raw) if v is None or v == "" or (isinstance(v, float) and math.isnan(v))
        )
        raise DataError(f"{where}: row {row} has no {spec.label!r} (an empty label); every row needs one.")
    if spec.regression:
        labels = []
        for i, value in enumerate(raw):
            try:
                if isinstance(value, bool):
                    raise ValueError
                labels.append(float(value))
            except (TypeError, ValueError):
                raise DataError(
                    f"{where}: row {i}: {spec.label} {value!r} is not a number; a regression task needs "
                    "numeric labels (use kind: classification for named classes)."
                ) from None
    else:
        if spec.labels is None:
            if split != "train":
                load_custom_rows(spec, "train")  # infers spec.labels from train
            else:
                spec.labels = infer_labels(raw)
                if len(spec.labels) < 2:
                    raise DataError(
                        f"{where}: column {spec.label!r} has a single value {spec.labels!r}; a classification "
                        "task needs at least two labels (or list them in labels)."
                    )
        ids = {_label_key(v): i for i, v in enumerate(spec.labels)}
        labels = []
        for i, value in enumerate(raw):
            key = _label_key(value)
            if key not in ids:
                raise DataError(
                    f"{where}: row {i}: {spec.label} {value!r} is not in the label list "
                    f"[{', '.join(map(str, spec.labels))}]; add it to labels or fix the row."
                )
            labels.append(ids[key])
    texts = [list(ds[c]) for c in spec.text]
    for column, values in zip(spec.text, texts):
        bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
        if bad is not None:
            raise DataError(f"{where}: row {bad}: text column {column!r} holds {values[bad]!r}, not text.")
    return {"text": texts[0], "text_pair": texts[1] if len(texts) > 1 else None, "label": labels}


def label_names(spec: TaskSpec) -> tuple[str, ...]:
    """The class names in id order (reads the train split when they are inferred); empty for regression."""
    if spec.regression:
        return ()
    if spec.labels is None:
        load_custom_rows(spec, "train")
    return tuple(str(v) for v in spec.labels)


__all__ = ["KINDS", "TaskSpec", "infer_labels", "label_names", "load_custom_rows", "load_task_file"]
