"""``sparse-nlp bench MODEL --vs OTHER``: CPU forward speed of two models, side by side in one process."""

from __future__ import annotations

import argparse

from ..errors import BenchError


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BenchError(f"--{what} must be comma-separated positive integers, got {text!r}.") from None
    if not values or any(v < 1 for v in values):
        raise BenchError(f"--{what} must be comma-separated positive integers, got {text!r}.")
    return values


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="compare the CPU speed of two models",
        description=(
            "Time the forward pass of MODEL and OTHER on the same random inputs, alternating between them after "
            "warm-up, in one process; print median and p90 latency, throughput and MODEL's speed-up over OTHER."
        ),
    )
    p.add_argument("model", help="local folder, Hub id, or alias (minilm, smollm2)")
    p.add_argument(
        "--vs", dest="other", required=True, help="the reference model (ratios are relative to it)"
    )
    p.add_argument("--batch", default="1,32", help="comma-separated batch sizes (default 1,32)")
    p.add_argument("--seq", default="128", help="comma-separated sequence lengths in tokens (default 128)")
    p.add_argument("--warmup", type=int, default=3, help="untimed passes per model and shape (default 3)")
    p.add_argument("--repeats", type=int, default=10, help="timed passes per model and shape (default 10)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's setting)"
    )
    p.add_argument(
        "--runtime",
        choices=("dense", "sparse"),
        default="dense",
        help="'sparse': pack MODEL's sparse Linear layers for CPU inference first (sparse_nlp.runtime.convert, "
        "autotuned on these batch x seq token counts); OTHER runs dense (default: dense)",
    )
    p.add_argument("--json", dest="json_path", help="also write the results as JSON to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import os
    from pathlib import Path

    import torch

    from ..evaluation.speed import compare_speed, format_table
    from ..models import load_model

    batches = _int_list(args.batch, "batch")
    seqs = _int_list(args.seq, "seq")
    if args.threads is not None and args.threads < 1:
        raise BenchError(f"--threads must be >= 1, got {args.threads}.")
    if args.warmup < 0 or args.repeats < 1:
        raise BenchError(f"--warmup must be >= 0 and --repeats >= 1, got {args.warmup} and {args.repeats}.")
    model, _ = load_model(args.model)
    other, _ = load_model(args.other)
    labels = {"model": args.model, "other": args.other}
    if args.model == args.other:
        labels = {"model": f"{args.model} (a)", "other": f"{args.other} (b)"}
    for label, m in ((args.model, model), (args.other, other)):
        limit = getattr(m.config, "max_position_embeddings", None) or getattr(m.config, "n_positions", None)
        if limit and max(seqs) > limit:
            raise BenchError(
                f"--seq {max(seqs)} is longer than {label} accepts (max_position_embeddings {limit})."
            )
    if args.runtime == "sparse":
        from ..runtime import convert, converted_layers, kernels

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        convert(model, tokens=sorted({b * s for b in batches for s in seqs}))
        print(
            f"runtime sparse: {len(converted_layers(model))} Linear layers of {args.model} packed "
            f"(native kernel: {kernels.status()})"
        )
    load_before = os.getloadavg()
    rows = compare_speed(
        {labels["other"]: other, labels["model"]: model},
        batches=batches,
        seqs=seqs,
        warmup=args.warmup,
        repeats=args.repeats,
        threads=args.threads,
        reference=labels["other"],
    )
    load_after = os.getloadavg()
    threads = args.threads or torch.get_num_threads()
    print(format_table(rows))
    print(
        f"ratio = {args.other} median latency / {args.model} median latency, same run; threads {threads}; "
        f"load average {load_before[0]:.1f} -> {load_after[0]:.1f}"
    )
    if args.json_path:
        payload = {
            "model": args.model,
            "vs": args.other,
            "threads": threads,
            "runtime": args.runtime,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "loadavg_before": list(load_before),
            "loadavg_after": list(load_after),
            "rows": [r.to_dict() for r in rows],
            "speedup": [
                {"batch": r.batch, "seq": r.seq, "ratio": r.ratio} for r in rows if r.model == labels["model"]
            ],
        }
        Path(args.json_path).write_text(json.dumps(payload, indent=2) + "\n")
    return 0
