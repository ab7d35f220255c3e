"""Real quality: magnitude pruning of the real all-MiniLM-L6-v2, scored on the real STS-B dev set.

Measured with this code (``python benchmarks/foundation_quality.py``): dense Spearman 86.72; per-row
magnitude 50% on every encoder Linear layer 85.18. The threshold leaves 0.4 points for platform noise.
"""

from __future__ import annotations

import pytest

import sparse_nlp
from sparse_nlp.evaluation.embeddings import stsb_scores
from sparse_nlp.models import load_model

pytestmark = pytest.mark.real


def test_magnitude_50_on_minilm_stsb(minilm_path, data_dir):
    model, tokenizer = load_model("minilm")
    sparse_nlp.sparsify(model, sparse_nlp.SparsityConfig.magnitude(0.5, scope="per-row"), progress=False)
    result = sparse_nlp.report(model)
    assert result.groups["attention"].sparsity == pytest.approx(0.5)
    assert result.groups["ffn"].sparsity == pytest.approx(0.5)
    scores = stsb_scores(model, tokenizer, data_dir=data_dir)
    assert scores["pairs"] == 1500
    assert 84.8 <= scores["spearman"] < 86.72  # pruning costs something, but not much
