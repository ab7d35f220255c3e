"""Perplexity from per-token negative log-likelihoods (offline `evaluate` metric module).

Unlike the Hub's ``perplexity`` (which downloads a model), this takes the losses a model already produced:
``exp(mean(nll))`` over all tokens.
"""

import datasets
import evaluate
import numpy as np

_KWARGS = """
Args:
    predictions (list of float): Negative log-likelihood of each token (natural log).
Returns:
    perplexity (float): exp of the mean NLL; mean_nll (float).
"""


class Perplexity(evaluate.Metric):
    """Perplexity of token losses."""

    def _info(self):
        return evaluate.MetricInfo(
            description="Perplexity = exp(mean token negative log-likelihood).",
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("float64")}),
        )

    def _compute(self, predictions):
        nll = np.asarray(predictions, dtype=np.float64)
        mean = float(nll.mean()) if len(nll) else float("nan")
        return {"perplexity": float(np.exp(mean)), "mean_nll": mean}
