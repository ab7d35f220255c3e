"""GLUE metrics by task name (config name = task), computed offline (an `evaluate` metric module).

Keys follow the Hub's ``glue`` metric: sst2/rte -> accuracy; cola -> matthews_correlation; stsb -> pearson,
spearmanr; mrpc/qqp -> accuracy, f1.
"""

import datasets
import evaluate
import numpy as np
from scipy import stats

TASKS = ("sst2", "cola", "rte", "stsb", "mrpc", "qqp", "mnli", "qnli", "wnli")
_KWARGS = """
Args:
    predictions: Predicted labels (float scores for stsb).
    references: Gold labels (float scores for stsb).
Returns:
    The task's GLUE metrics, each in [0, 1] (correlations in [-1, 1]).
"""


def _matthews(pred, ref):
    tp = float(np.sum((pred == 1) & (ref == 1)))
    tn = float(np.sum((pred == 0) & (ref == 0)))
    fp = float(np.sum((pred == 1) & (ref == 0)))
    fn = float(np.sum((pred == 0) & (ref == 1)))
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else float((tp * tn - fp * fn) / denom)


def _f1(pred, ref):
    tp = float(np.sum((pred == 1) & (ref == 1)))
    wrong = float(np.sum(pred != ref))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + wrong)


class Glue(evaluate.Metric):
    """The GLUE metric of one task; ``evaluate.load(path_to_this_file, "sst2")``."""

    def _info(self):
        if self.config_name not in TASKS:
            raise KeyError(f"unknown GLUE task {self.config_name!r}; use one of {', '.join(TASKS)}.")
        value = "float64" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description="GLUE benchmark metrics.",
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value(value), "references": datasets.Value(value)}
            ),
        )

    def _compute(self, predictions, references):
        pred = np.asarray(predictions)
        ref = np.asarray(references)
        if self.config_name == "stsb":
            return {
                "pearson": float(stats.pearsonr(pred, ref)[0]),
                "spearmanr": float(stats.spearmanr(pred, ref)[0]),
            }
        if self.config_name == "cola":
            return {"matthews_correlation": _matthews(pred, ref)}
        accuracy = float((pred == ref).mean()) if len(ref) else 0.0
        if self.config_name in ("mrpc", "qqp"):
            return {"accuracy": accuracy, "f1": _f1(pred, ref)}
        return {"accuracy": accuracy}
