"""Pearson and Spearman correlation of real-valued predictions (the STS-B metric; offline `evaluate` module)."""

import datasets
import evaluate
import numpy as np
from scipy import stats

_DESCRIPTION = "Pearson and Spearman rank correlation between predictions and references."
_KWARGS = """
Args:
    predictions (list of float): Predicted scores.
    references (list of float): Gold scores.
Returns:
    pearson (float), spearmanr (float): in [-1, 1].
"""


class PearsonSpearman(evaluate.Metric):
    """Pearson r and Spearman rho, computed locally with scipy."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}
            ),
        )

    def _compute(self, predictions, references):
        pred = np.asarray(predictions, dtype=np.float64)
        ref = np.asarray(references, dtype=np.float64)
        return {
            "pearson": float(stats.pearsonr(pred, ref)[0]),
            "spearmanr": float(stats.spearmanr(pred, ref)[0]),
        }
