"""Side-by-side speed comparison and the ``sparse-nlp bench`` command (tiny models, fake clock)."""

from __future__ import annotations

import json
import statistics
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sparse_nlp.checkpoint import save_pretrained
from sparse_nlp.cli import main
from sparse_nlp.evaluation.speed import compare_speed, format_table, percentile
from sparse_nlp.structured import StructuredSparsity, apply_structured
from tests.conftest import tiny_model


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeModel(nn.Module):
    """Advances a fake clock by `cost` seconds per sequence; records the call order."""

    def __init__(self, name, cost, clock, calls):
        super().__init__()
        self.name, self.cost, self.clock, self.calls = name, cost, clock, calls
        self.config = SimpleNamespace(vocab_size=50)

    def forward(self, input_ids, attention_mask):
        self.calls.append(self.name)
        self.clock.now += self.cost * input_ids.shape[0]


def test_compare_speed_ratio_and_alternation():
    clock, calls = FakeClock(), []
    models = {
        "dense": FakeModel("dense", 0.03, clock, calls),
        "small": FakeModel("small", 0.01, clock, calls),
    }
    rows = compare_speed(models, batches=[1, 4], seqs=[8], warmup=1, repeats=4, clock=clock)
    assert [(r.model, r.batch) for r in rows] == [("dense", 1), ("small", 1), ("dense", 4), ("small", 4)]
    small4 = rows[3]
    assert small4.median_ms == pytest.approx(40.0)
    assert small4.throughput == pytest.approx(100.0)
    assert small4.ratio == pytest.approx(3.0)
    assert rows[2].ratio == 1.0
    # warm-up (dense, small), then repetitions alternate the order: d s, s d, d s, s d
    assert calls[:10] == [
        "dense",
        "small",
        "dense",
        "small",
        "small",
        "dense",
        "dense",
        "small",
        "small",
        "dense",
    ]
    assert "3.00x" in format_table(rows)


def test_compare_speed_bad_arguments():
    with pytest.raises(ValueError, match="at least one"):
        compare_speed({}, batches=[1], seqs=[8])
    clock = FakeClock()
    with pytest.raises(ValueError, match="reference"):
        compare_speed(
            {"a": FakeModel("a", 0.1, clock, [])}, batches=[1], seqs=[8], reference="b", clock=clock
        )
    with pytest.raises(ValueError, match="repeats"):
        compare_speed({"a": FakeModel("a", 0.1, clock, [])}, batches=[1], seqs=[8], repeats=0, clock=clock)


def test_percentile():
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile([10.0, 20.0], 90) == pytest.approx(19.0)
    assert percentile([7.0], 90) == 7.0


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    dense = tiny_model("bert")
    save_pretrained(dense, root / "dense")
    pruned = tiny_model("bert")
    apply_structured(pruned, StructuredSparsity(heads=0.5, ffn=0.5, score="weight-norm"), progress=False)
    save_pretrained(pruned, root / "pruned")
    return root


def test_bench_command_json_ratio_from_same_run(two_models, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            str(two_models / "pruned"),
            "--vs",
            str(two_models / "dense"),
            "--batch",
            "1,2",
            "--seq",
            "8,16",
            "--warmup",
            "1",
            "--repeats",
            "3",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "median ms" in printed and "ratio" in printed
    data = json.loads(out.read_text())
    assert data["threads"] == 1 and data["repeats"] == 3
    rows = data["rows"]
    assert len(rows) == 8 and len(data["speedup"]) == 4
    for shape in data["speedup"]:
        ref = next(
            r
            for r in rows
            if r["model"] == data["vs"] and (r["batch"], r["seq"]) == (shape["batch"], shape["seq"])
        )
        mine = next(
            r
            for r in rows
            if r["model"] == data["model"] and (r["batch"], r["seq"]) == (shape["batch"], shape["seq"])
        )
        assert len(ref["times_ms"]) == len(mine["times_ms"]) == 3
        assert mine["median_ms"] == pytest.approx(statistics.median(mine["times_ms"]))
        assert shape["ratio"] == pytest.approx(ref["median_ms"] / mine["median_ms"])
    assert torch.get_num_threads() >= 1


def test_bench_command_bad_input(two_models, capsys):
    assert (
        main(["bench", str(two_models / "pruned"), "--vs", str(two_models / "dense"), "--batch", "a,2"]) == 2
    )
    assert "--batch" in capsys.readouterr().err
    assert (
        main(["bench", str(two_models / "pruned"), "--vs", str(two_models / "dense"), "--seq", "4096"]) == 2
    )
    assert "max_position_embeddings" in capsys.readouterr().err


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="this machine has a GPU (tests/test_attention_cuda.py runs it)"
)
def test_gpu_attention_benchmark_says_it_needs_a_gpu():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "benchmarks/attention_speed_gpu.py", "--lengths", "256"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stdout
