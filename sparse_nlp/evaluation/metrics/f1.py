"""F1 score of the positive class (binary) or averaged over classes (offline `evaluate` metric module)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "F1 = 2 * precision * recall / (precision + recall)."
_KWARGS = """
Args:
    predictions (list of int): Predicted labels.
    references (list of int): Ground-truth labels.
    average (str): "binary" (default, class `pos_label`), "macro" or "micro".
    pos_label (int): Positive class for "binary" (default 1).
Returns:
    f1 (float): in [0, 1].
"""


def _binary_f1(pred, ref, label):
    tp = float(np.sum((pred == label) & (ref == label)))
    fp = float(np.sum((pred == label) & (ref != label)))
    fn = float(np.sum((pred != label) & (ref == label)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


class F1(evaluate.Metric):
    """F1, computed locally (no Hub, no scikit-learn)."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, average="binary", pos_label=1):
        pred = np.asarray(predictions)
        ref = np.asarray(references)
        if average == "binary":
            return {"f1": _binary_f1(pred, ref, pos_label)}
        if average == "macro":
            labels = np.unique(np.concatenate([pred, ref]))
            return {"f1": float(np.mean([_binary_f1(pred, ref, c) for c in labels]))}
        if average == "micro":
            return {"f1": float((pred == ref).mean()) if len(ref) else 0.0}
        raise ValueError(f"average must be binary, macro or micro, got {average!r}.")
