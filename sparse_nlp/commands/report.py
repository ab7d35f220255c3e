"""``sparse-nlp report DIR``: measured sparsity per Linear layer and per group."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="print the measured sparsity of a model",
        description="Print the measured sparsity of every Linear layer of MODEL and totals per group.",
    )
    p.add_argument("model", help="local folder, Hub id, or alias (minilm, smollm2)")
    p.add_argument(
        "--json", dest="json_path", help="also write the report as JSON to this file ('-' for stdout only)"
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a checkpoint's own Python code to run (off by default: such checkpoints are refused)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..models import load_model
    from ..report import report

    model, _ = load_model(args.model, trust_remote_code=args.trust_remote_code)
    result = report(model)
    if args.json_path == "-":
        print(result.to_json())
        return 0
    print(result)
    if args.json_path:
        Path(args.json_path).write_text(result.to_json() + "\n")
    return 0
