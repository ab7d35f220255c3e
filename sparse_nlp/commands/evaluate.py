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
    p.add_argument(
        "--allow-untrained-head",
        action="store_true",
        help="evaluate a model without a trained classification head (a random one is added); the result is "
        "printed (and written only to --json, marked untrained_head), never into MODEL where push would publish it",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a checkpoint's own Python code to run (off by default: such checkpoints are refused)",
    )
    p.set_defaults(func=run)


def trained_head(path: str) -> bool | None:
    """Whether the model folder's config.json names a sequence-classification class (None: not a local folder)."""
    import json
    from pathlib import Path

    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError):
        return None  # loading names the damage
    archs = raw.get("architectures") if isinstance(raw, dict) else None
    return any(str(a).endswith("ForSequenceClassification") for a in archs or [])


def run(args: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    from ..checkpoint import CheckpointError
    from ..evaluation.data import load_glue_rows
    from ..evaluation.tasks import evaluate_glue, load_for_task
    from ..models import resolve_device, resolve_model
    from ..report import measured_sparsity

    # every input is checked before the model is loaded
    device = resolve_device(args.device)
    path = resolve_model(args.model)
    if args.json_path and not Path(args.json_path).resolve().parent.is_dir():
        raise FileNotFoundError(f"--json {args.json_path!r}: its folder does not exist.")
    load_glue_rows(args.task, args.split, args.data_dir)
    untrained = trained_head(path) is False
    if untrained and not args.allow_untrained_head:
        raise CheckpointError(
            f"{path}/config.json: the model has no trained sequence-classification head (architectures: "
            f"not *ForSequenceClassification), so {args.task} would be scored with a random head. Fine-tune it "
            "first (sparse-nlp run), or pass --allow-untrained-head to score it anyway (nothing is written "
            "where push would publish it)."
        )
    model, tokenizer = load_for_task(args.model, args.task, trust_remote_code=args.trust_remote_code)
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
    if untrained:
        result["untrained_head"] = True  # push never publishes such a result
    text = json.dumps(result, indent=2)
    print(text)
    out = (
        Path(args.json_path)
        if args.json_path
        else (
            Path(args.model) / f"eval_{args.task}.json"
            if Path(args.model).is_dir() and not untrained
            else None
        )
    )
    if out is not None:
        out.write_text(text + "\n")
    return 0
