"""``sparse-nlp evaluate DIR --task sst2|wikitext2|FILE.txt``: score a model, print and write JSON.

GLUE tasks score a sequence-classification model; ``wikitext2``, ``tinyshakespeare`` and ``.txt`` files give
a causal LM's perplexity with sliding windows (`sparse_nlp.evaluation.perplexity`).
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from ..evaluation.perplexity import PERPLEXITY_TASKS
    from ..evaluation.tasks import TASKS

    p = subparsers.add_parser(
        "evaluate",
        help="score a model on a GLUE task or its perplexity on a text corpus",
        description="Evaluate MODEL on a GLUE dev set, or a causal LM's perplexity on wikitext2 (test split), "
        "tinyshakespeare or a .txt file; prints the metrics as JSON and writes them to --json.",
    )
    p.add_argument("model", help="model folder (sparse or dense), Hub id, or alias (minilm, smollm2)")
    p.add_argument(
        "--task",
        required=True,
        metavar="TASK",
        help=f"GLUE task ({', '.join(sorted(TASKS))}), or perplexity: {', '.join(PERPLEXITY_TASKS)} or a .txt file",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="local GLUE data directory (default $SPARSE_NLP_DATA_DIR, then the Hub)",
    )
    p.add_argument(
        "--split",
        default=None,
        choices=["dev", "train", "valid", "test"],
        help="GLUE: dev (default) or train; wikitext2: test (default) or valid",
    )
    p.add_argument("--context", type=int, default=1024, help="perplexity: tokens per window (default 1024)")
    p.add_argument(
        "--stride", type=int, default=None, help="perplexity: tokens between windows (default: --context)"
    )
    p.add_argument("--max-windows", type=int, default=None, help="perplexity: score only the first N windows")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
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

    from ..config import ConfigError
    from ..evaluation.perplexity import is_perplexity_task
    from ..evaluation.tasks import evaluate_glue, load_for_task, task_info
    from ..recipes import measured_sparsity, resolve_device

    device = resolve_device(args.device)
    if is_perplexity_task(args.task):
        result, model = _perplexity(args, device)
        start = time.perf_counter() - result.pop("seconds")
    else:
        try:
            task_info(args.task)  # an unknown task fails before the model loads
        except ValueError as err:
            raise ConfigError(
                f"--task: {err} Perplexity tasks: wikitext2, tinyshakespeare or a .txt file."
            ) from None
        if args.split in ("valid", "test"):
            raise SystemExit(f"error: GLUE task {args.task!r} has splits dev and train, not {args.split!r}")
        model, tokenizer = load_for_task(args.model, args.task)
        model.to(device)
        start = time.perf_counter()
        result = evaluate_glue(
            model,
            tokenizer,
            args.task,
            data_dir=args.data_dir,
            split=args.split or "dev",
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
    stem = Path(args.task).stem if args.task.endswith(".txt") else args.task
    path = (
        Path(args.json_path)
        if args.json_path
        else (Path(args.model) / f"eval_{stem}.json" if Path(args.model).is_dir() else None)
    )
    if path is not None:
        path.write_text(text + "\n")
    return 0


def _perplexity(args: argparse.Namespace, device):
    """(result, model) for a perplexity task; the text is read before the model loads."""
    import time

    from ..evaluation.perplexity import evaluate_perplexity, perplexity_text
    from ..models import load_model

    if args.split in ("dev", "train") and args.task == "wikitext2":
        raise SystemExit("error: wikitext2 has splits test and valid; use --split test or --split valid")
    text, source = perplexity_text(args.task, split=args.split, data_dir=args.data_dir)
    model, tokenizer = load_model(args.model, task="causal-lm")
    model.to(device)
    start = time.perf_counter()
    result = evaluate_perplexity(
        model,
        tokenizer,
        text,
        context=args.context,
        stride=args.stride,
        max_windows=args.max_windows,
        progress=not args.no_progress,
    )
    return {**source, **result, "seconds": time.perf_counter() - start}, model
