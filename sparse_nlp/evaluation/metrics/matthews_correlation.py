"""Matthews correlation coefficient (the CoLA metric; offline `evaluate` metric module)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Matthews correlation coefficient of binary (or multi-class) predictions, in [-1, 1]."
_KWARGS = """
Args:
    predictions (list of int): Predicted labels.
    references (list of int): Ground-truth labels.
Returns:
    matthews_correlation (float): in [-1, 1]; 0 when a marginal is constant.
"""


def matthews(pred, ref):
    """Multi-class MCC (Gorodkin 2004), equal to the binary formula for two classes."""
    labels = np.unique(np.concatenate([pred, ref]))
    index = {c: i for i, c in enumerate(labels)}
    conf = np.zeros((len(labels), len(labels)), dtype=np.float64)
    for p, r in zip(pred, ref):
        conf[index[r], index[p]] += 1
    t = conf.sum(axis=1)
    p = conf.sum(axis=0)
    c = np.trace(conf)
    s = conf.sum()
    denom = np.sqrt((s * s - (p * p).sum()) * (s * s - (t * t).sum()))
    return 0.0 if denom == 0 else float((c * s - (t * p).sum()) / denom)


class MatthewsCorrelation(evaluate.Metric):
    """Matthews correlation, computed locally (no Hub, no scikit-learn)."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        return {"matthews_correlation": matthews(np.asarray(predictions), np.asarray(references))}
