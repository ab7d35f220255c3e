"""``sparse-nlp evaluate DIR --task sst2|TASK.yaml|wikitext2|FILE.txt``: score a model, print and write JSON.

GLUE tasks and task descriptions (``.yaml`` / ``.yml`` / ``.json`` files describing your own data, see
`sparse_nlp.evaluation.custom`) score a sequence-classification model; ``wikitext2``, ``tinyshakespeare`` and
``.txt`` files give a causal LM's perplexity with sliding windows (`sparse_nlp.evaluation.perplexity`).
"""

from __future__ import annotations

import argparse

from ..evaluation.corpora import PERPLEXITY_TASKS
from ..evaluation.glue import EVALUABLE

TASK_FILE_SUFFIXES = (".yaml", ".yml", ".json")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score a model on a GLUE task, your own data, or its perplexity on a text corpus",
        description="Evaluate MODEL on a GLUE dev set or your own data (a task description file), or a causal "
        "LM's perplexity on wikitext2 (test split), tinyshakespeare or a .txt file; prints the metrics as JSON "
        "and writes them to --json.",
    )
    p.add_argument("model", help="model folder (sparse or dense), Hub id, or alias (minilm, smollm2)")
    p.add_argument(
        "--task",
        required=True,
        metavar="TASK",
        help=f"GLUE task ({', '.join(sorted(EVALUABLE))}), a task description file (.yaml, .yml or .json: "
        f"your own data), or perplexity: {', '.join(PERPLEXITY_TASKS)} or a .txt file",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="local GLUE data directory (default $SPARSE_NLP_DATA_DIR, then the Hub)",
    )
    p.add_argument(
        "--split",
        default=None,
        choices=["dev", "train", "dev_matched", "dev_mismatched", "valid", "test"],
        help="GLUE: dev (default; MNLI: matched and mismatched) or train (MNLI also dev_matched, "
        "dev_mismatched); wikitext2: test (default) or valid",
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

    from ..errors import CheckpointError, ConfigError
    from ..evaluation.custom import load_task_file
    from ..evaluation.data import glue_splits
    from ..evaluation.perplexity import is_perplexity_task
    from ..evaluation.tasks import evaluate_glue, load_for_task, load_rows, task_info, task_name
    from ..models import resolve_device, resolve_model
    from ..report import measured_sparsity

    # every input is checked before the model is loaded
    device = resolve_device(args.device)
    if args.json_path and not Path(args.json_path).resolve().parent.is_dir():
        raise FileNotFoundError(f"--json {args.json_path!r}: its folder does not exist.")
    untrained = False
    task = load_task_file(args.task) if args.task.endswith(TASK_FILE_SUFFIXES) else args.task
    if isinstance(task, str) and is_perplexity_task(task):
        result, model = _perplexity(args, device)
        start = time.perf_counter() - result.pop("seconds")
    else:
        if isinstance(task, str):
            try:
                task_info(task)  # an unknown task fails before the model loads
            except ValueError as err:
                raise ConfigError(
                    f"--task: {err} Task descriptions: a .yaml, .yml or .json file. Perplexity tasks: "
                    f"{', '.join(PERPLEXITY_TASKS)} or a .txt file."
                ) from None
        splits = glue_splits(task) if isinstance(task, str) else ["dev", "train"]
        split = args.split or "dev"
        if split not in splits:
            raise ConfigError(
                f"--split: task {task_name(task)!r} has splits {', '.join(splits)}, not {split!r}."
            )
        path = resolve_model(args.model)
        load_rows(task, split, args.data_dir)
        task_info(task)  # a described task's labels, from its train split
        untrained = trained_head(path) is False
        if untrained and not args.allow_untrained_head:
            raise CheckpointError(
                f"{path}/config.json: the model has no trained sequence-classification head (architectures: "
                f"not *ForSequenceClassification), so {task_name(task)} would be scored with a random head. "
                "Fine-tune it first (sparse-nlp run), or pass --allow-untrained-head to score it anyway (nothing "
                "is written where push would publish it)."
            )
        model, tokenizer = load_for_task(args.model, task, trust_remote_code=args.trust_remote_code)
        model.to(device)
        start = time.perf_counter()
        result = evaluate_glue(
            model,
            tokenizer,
            task,
            data_dir=args.data_dir,
            split=split,
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
    stem = Path(args.task).stem if args.task.endswith(".txt") else task_name(task)
    out = (
        Path(args.json_path)
        if args.json_path
        else (Path(args.model) / f"eval_{stem}.json" if Path(args.model).is_dir() and not untrained else None)
    )
    if out is not None:
        out.write_text(text + "\n")
    return 0


def _perplexity(args: argparse.Namespace, device):
    """(result, model) for a perplexity task; the text is read before the model loads."""
    import time

    from ..errors import ConfigError
    from ..evaluation.perplexity import evaluate_perplexity, perplexity_text
    from ..models import load_model

    if args.split in ("dev", "train") and args.task == "wikitext2":
        raise ConfigError("--split: wikitext2 has splits test and valid; use --split test or --split valid.")
    text, source = perplexity_text(args.task, split=args.split, data_dir=args.data_dir)
    model, tokenizer = load_model(args.model, task="causal-lm", trust_remote_code=args.trust_remote_code)
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
