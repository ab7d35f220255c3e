"""Offline `evaluate` metric modules, and `load_metric` that finds them by name.

``evaluate.load("accuracy")`` downloads a script from the Hub and fails offline. Each file here is a
standalone ``evaluate.Metric`` module (one import per line: evaluate's import scanner misreads
``import a, b``), loaded by file path; names we do not ship fall back to ``evaluate.load(name)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

METRICS_DIR = Path(__file__).resolve().parent
METRICS = {
    "accuracy": "accuracy.py",
    "f1": "f1.py",
    "matthews_correlation": "matthews_correlation.py",
    "pearson_spearman": "pearson_spearman.py",
    "glue": "glue.py",
    "perplexity": "perplexity.py",
}


def metric_path(name: str) -> Path | None:
    """The file of a shipped metric module, or None."""
    return METRICS_DIR / METRICS[name] if name in METRICS else None


def load_metric(name: str, config_name: str | None = None, **kwargs: Any):
    """An `evaluate.EvaluationModule` by name: ours by file path (offline), others through ``evaluate.load``.

    Args:
        name: ``accuracy``, ``f1``, ``matthews_correlation``, ``pearson_spearman``, ``glue``, ``perplexity``,
            or any name ``evaluate.load`` knows (needs the Hub).
        config_name: e.g. the GLUE task for ``glue``.
    """
    import evaluate

    path = metric_path(name)
    return evaluate.load(str(path) if path is not None else name, config_name, **kwargs)
