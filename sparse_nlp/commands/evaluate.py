"""``sparse-nlp evaluate DIR --task sst2 --data-dir ...``: score a model on a GLUE task, print and write JSON."""

from __future__ import annotations

import argparse

from ..evaluation.glue import EVALUABLE


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score a sequence-classification model on a GLUE task",
        description="Evaluate MODEL on a GLUE dev set; prints the metrics as JSON and writes them to --json.",
    )
    p.add_argument("model", help="model folder (sparse or dense), Hub id, or alias")
    p.add_argument("--task", required=True, choices=sorted(EVALUABLE))
    p.add_argument(
        "--data-dir",
        default=None,
        help="local GLUE data directory (default $SPARSE_NLP_DATA_DIR, then the Hub)",
    )
    p.add_argument("--split", default="dev", choices=["dev", "train"])
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    p.add_argument(
        "--device", default="auto", help="auto (a CUDA GPU when there is one, else CPU), cpu, cuda or cuda:N"
    )
    p.add_argument(
        "--json", dest="json_path", default=None, help="output JSON file (default MODEL/eval_<task>.json)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    from ..evaluation.tasks import evaluate_glue, load_for_task
    from ..models import resolve_device
    from ..report import measured_sparsity

    device = resolve_device(args.device)
    model, tokenizer = load_for_task(args.model, args.task)
    model.to(device)
    start = time.perf_counter()
    result = evaluate_glue(
        model,
        tokenizer,
        args.task,
        data_dir=args.data_dir,
        split=args.split,
        max_length=args.max_length,
        batch_size=args.batch_size,
        limit=args.limit,
    )
    result.update(
        measured_sparsity(model),
        model=str(args.model),
        device=str(device),
        eval_seconds=round(time.perf_counter() - start, 1),
    )
    text = json.dumps(result, indent=2)
    print(text)
    path = (
        Path(args.json_path)
        if args.json_path
        else (Path(args.model) / f"eval_{args.task}.json" if Path(args.model).is_dir() else None)
    )
    if path is not None:
        path.write_text(text + "\n")
    return 0
