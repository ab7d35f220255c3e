"""Side-by-side CPU speed of models: the same inputs, alternating runs, after warm-up, in one process.

On a shared machine absolute latencies drift with the load; models timed in alternation see the same load,
so their ratio is meaningful even when the absolute numbers are not. Every repetition runs all models, and
the order is reversed on every other repetition so neither model always runs first.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn


@dataclass
class SpeedRow:
    """Timings of one model at one input shape.

    Attributes:
        model: Label of the model.
        batch: Sequences per forward pass.
        seq: Tokens per sequence.
        median_ms: Median latency of one forward pass.
        p90_ms: 90th percentile latency.
        throughput: Sequences per second at the median latency.
        ratio: Throughput relative to the reference model of the same run (1.0 for the reference).
        times_ms: Every measured latency, in run order.
    """

    model: str
    batch: int
    seq: int
    median_ms: float
    p90_ms: float
    throughput: float
    ratio: float = 1.0
    times_ms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between order statistics."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of an empty list")
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def make_inputs(model: nn.Module, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids (full attention mask) of shape (batch, seq) within the model's vocabulary."""
    vocab = int(getattr(model.config, "vocab_size", 1000))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(5, vocab - 1), vocab, (batch, seq), generator=g)  # (B, T)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """Run with `threads` intra-op threads (None: leave torch's setting), restoring the old value after."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def compare_speed(
    models: Mapping[str, nn.Module],
    *,
    batches: list[int],
    seqs: list[int],
    warmup: int = 2,
    repeats: int = 10,
    threads: int | None = None,
    reference: str | None = None,
    clock=time.perf_counter,
) -> list[SpeedRow]:
    """Time the forward pass of every model at every (batch, seq), alternating models, in this process.

    Args:
        models: Label -> model (put in eval mode here).
        batches: Batch sizes.
        seqs: Sequence lengths (tokens).
        warmup: Untimed passes per model and shape before timing.
        repeats: Timed passes per model and shape.
        threads: torch intra-op threads (None: torch's current setting).
        reference: Label of the model the ratios are relative to (default: the first).
        clock: Timer returning seconds (tests may pass a fake one).

    Returns:
        One `SpeedRow` per model and shape; ``ratio`` = reference median latency / this model's median latency.
    """
    if not models:
        raise ValueError("compare_speed needs at least one model.")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup must be >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}.")
    names = list(models)
    reference = reference or names[0]
    if reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the models: {', '.join(names)}.")
    for model in models.values():
        model.eval()
    rows: list[SpeedRow] = []
    with num_threads(threads), torch.inference_mode():
        for batch in batches:
            for seq in seqs:
                inputs = {n: make_inputs(m, batch, seq) for n, m in models.items()}
                for _ in range(warmup):
                    for n in names:
                        models[n](**inputs[n])
                times: dict[str, list[float]] = {n: [] for n in names}
                for r in range(repeats):
                    for n in names if r % 2 == 0 else reversed(names):
                        start = clock()
                        models[n](**inputs[n])
                        times[n].append((clock() - start) * 1000.0)
                shape_rows = {}
                for n in names:
                    med = statistics.median(times[n])
                    shape_rows[n] = SpeedRow(
                        model=n,
                        batch=batch,
                        seq=seq,
                        median_ms=med,
                        p90_ms=percentile(times[n], 90),
                        throughput=batch / (med / 1000.0) if med > 0 else float("inf"),
                        times_ms=times[n],
                    )
                ref_med = shape_rows[reference].median_ms
                for n in names:
                    row = shape_rows[n]
                    row.ratio = ref_med / row.median_ms if row.median_ms > 0 else float("inf")
                    rows.append(row)
    return rows


def format_table(rows: list[SpeedRow]) -> str:
    """A plain-text table of speed rows (what ``sparse-nlp bench`` prints)."""
    header = (
        f"{'model':<28} {'batch':>5} {'seq':>5} {'median ms':>10} {'p90 ms':>9} {'seq/s':>9} {'ratio':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        label = r.model if len(r.model) <= 28 else "..." + r.model[-25:]
        lines.append(
            f"{label:<28} {r.batch:>5} {r.seq:>5} {r.median_ms:>10.2f} {r.p90_ms:>9.2f} {r.throughput:>9.1f} {r.ratio:>6.2f}x"
        )
    return "\n".join(lines)
