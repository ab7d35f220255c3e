"""Model card rendering and the evaluation / benchmark JSON readers (offline, in-process)."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from sparse_nlp import AttentionSparsity, SparsityConfig, WeightSparsity, report, sparsify
from sparse_nlp.hub import eval_results, render_model_card, speed_ratios

from .conftest import tiny_model


def test_eval_results_reads_trainer_and_evaluate_command_json():
    trainer = {
        "task": "sst2",
        "eval_accuracy": 88.76,
        "eval_loss": 0.3,
        "eval_runtime": 5.0,
        "train_seconds": 9,
    }
    command = {
        "task": "stsb",
        "split": "dev",
        "num_examples": 1500,
        "pearson": 86.1,
        "spearman": 85.9,
        "block_sparsity": 0.5,
    }
    results = eval_results([trainer, command])
    got = [
        (r.dataset_type, r.dataset_config, r.dataset_split, r.metric_type, r.metric_value) for r in results
    ]
    assert got == [
        ("nyu-mll/glue", "sst2", "validation", "accuracy", 88.76),
        ("nyu-mll/glue", "stsb", "validation", "pearson", 86.1),
        ("nyu-mll/glue", "stsb", "validation", "spearman", 85.9),
    ]
    assert (
        eval_results({"task": "wikitext2", "metrics": {"perplexity": 31.5}})[0].dataset_name == "WikiText-2"
    )
    with pytest.raises(ValueError, match="needs a 'task' key"):
        eval_results({"accuracy": 0.5})


def test_speed_ratios_from_bench_json_and_simple_forms():
    bench = {
        "vs": "minilm",
        "speedup": [{"batch": 1, "seq": 128, "ratio": 1.9}, {"batch": 32, "seq": 128, "ratio": 2.3}],
    }
    assert speed_ratios(bench) == [
        (1.9, "batch 1, seq 128; vs minilm"),
        (2.3, "batch 32, seq 128; vs minilm"),
    ]
    assert speed_ratios({"speedup": 1.5, "setting": "x"}) == [(1.5, "x")]
    assert speed_ratios({"dense_s": 3.0, "sparse_s": 1.5}) == [(2.0, "")]
    assert speed_ratios(None) == [] and speed_ratios({"nothing": 1}) == []


def test_card_reports_measured_sparsity_not_the_target(tmp_path):
    model = tiny_model("bert")
    sparsify(
        model,
        SparsityConfig(weights=[WeightSparsity(method="magnitude", sparsity=0.5, targets=["ffn"])]),
        progress=False,
    )
    card = render_model_card(
        model,
        "org/tiny-ffn",
        base_model="org/base",
        datasets=["org/calib"],
        evaluation={"task": "sst2", "accuracy": 80.0},
        benchmark={"speedup": 1.1, "setting": "tiny"},
    )
    text = str(card)
    parsed = ModelCard(text)
    assert parsed.data.base_model == "org/base"
    assert parsed.data.datasets == ["org/calib", "nyu-mll/glue"]
    assert [(r.metric_type, r.metric_value) for r in parsed.data.eval_results] == [("accuracy", 80.0)]
    assert {"sparse", "magnitude-pruning", "unstructured-sparsity"} <= set(parsed.data.tags)
    groups = report(model).groups
    assert groups["attention"].sparsity == 0.0  # ffn only
    for name, t in groups.items():
        assert f"| {name} | {t.numel:,} | {t.nonzeros:,} | {t.sparsity:.2%} |" in text
    assert "- 1.10x (tiny)" in text
    assert "AutoModel.from_pretrained" in text  # dense checkpoint: plain transformers loads it too


def test_card_says_positions_were_extended_by_tiling():
    model = tiny_model("bert")
    attention = AttentionSparsity("sliding_window", {"window": 8}, max_positions=300)
    sparsify(model, SparsityConfig(attention=attention), progress=False)
    text = str(render_model_card(model, "org/tiny-long"))
    assert "sparse pattern `sliding_window`" in text
    assert "extended to 300 positions by tiling the pretrained rows" in text
    plain = tiny_model("bert")
    sparsify(
        plain, SparsityConfig(attention=AttentionSparsity("sliding_window", {"window": 8})), progress=False
    )
    assert "tiling" not in str(render_model_card(plain, "org/tiny-window"))
