"""Offline evaluate metric modules: loadable by file path without the Hub, correct against references."""

from __future__ import annotations

import math

import evaluate
import numpy as np
import pytest
from scipy import stats

from sparse_nlp.evaluation.metrics import METRICS, load_metric, metric_path
from sparse_nlp.evaluation.tasks import compute_task_metrics

RNG = np.random.default_rng(0)
PRED = RNG.integers(0, 2, 200).tolist()
REF = RNG.integers(0, 2, 200).tolist()


def _mcc(p, r):
    p, r = np.asarray(p), np.asarray(r)
    tp, tn = np.sum((p == 1) & (r == 1)), np.sum((p == 0) & (r == 0))
    fp, fn = np.sum((p == 1) & (r == 0)), np.sum((p == 0) & (r == 1))
    return (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))


@pytest.mark.parametrize("name", sorted(METRICS))
def test_every_module_loads_offline_by_path(name):
    module = evaluate.load(str(metric_path(name)), "sst2" if name == "glue" else None)
    assert isinstance(module, evaluate.EvaluationModule)
    # evaluate's import scanner needs one import per line in metric modules
    source = metric_path(name).read_text()
    assert not any(line.startswith("import ") and "," in line for line in source.splitlines())


def test_accuracy_f1_matthews_match_references():
    p, r = np.asarray(PRED), np.asarray(REF)
    assert load_metric("accuracy").compute(predictions=PRED, references=REF)["accuracy"] == pytest.approx(
        (p == r).mean()
    )
    tp, fp, fn = np.sum((p == 1) & (r == 1)), np.sum((p == 1) & (r == 0)), np.sum((p == 0) & (r == 1))
    assert load_metric("f1").compute(predictions=PRED, references=REF)["f1"] == pytest.approx(
        2 * tp / (2 * tp + fp + fn)
    )
    mcc = load_metric("matthews_correlation").compute(predictions=PRED, references=REF)[
        "matthews_correlation"
    ]
    assert mcc == pytest.approx(_mcc(PRED, REF))
    assert load_metric("glue", "cola").compute(predictions=PRED, references=REF)[
        "matthews_correlation"
    ] == pytest.approx(mcc)
    assert (
        load_metric("matthews_correlation").compute(predictions=[1, 1, 1], references=[0, 1, 1])[
            "matthews_correlation"
        ]
        == 0.0
    )


def test_pearson_spearman_and_stsb():
    x = RNG.normal(size=100)
    y = x + RNG.normal(scale=0.5, size=100)
    out = load_metric("pearson_spearman").compute(predictions=x.tolist(), references=y.tolist())
    assert out["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert out["spearmanr"] == pytest.approx(stats.spearmanr(x, y)[0])
    assert compute_task_metrics("stsb", x.tolist(), y.tolist())["spearmanr"] == pytest.approx(
        100 * out["spearmanr"], abs=0.01
    )


def test_perplexity_and_glue_task_check():
    out = load_metric("perplexity").compute(predictions=[1.0, 2.0, 3.0])
    assert out["perplexity"] == pytest.approx(math.exp(2.0))
    with pytest.raises(KeyError, match="unknown GLUE task"):
        load_metric("glue", "sst3")


def test_unknown_names_fall_back_to_evaluate_load(monkeypatch):
    seen = []
    monkeypatch.setattr(evaluate, "load", lambda path, config_name=None, **kw: seen.append(path) or "loaded")
    assert load_metric("bleu") == "loaded" and seen == ["bleu"]
