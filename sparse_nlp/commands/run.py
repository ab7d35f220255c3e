"""``sparse-nlp run RECIPE --data-dir ... --out ...``: run a YAML recipe end to end."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="run a recipe (fine-tune -> prune with distillation -> evaluate)",
        description="Run the stages of a YAML recipe; writes checkpoints, recipe.yaml and results.json under --out.",
    )
    p.add_argument("recipe", help="YAML recipe file (see recipes/)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--data-dir",
        default=None,
        help="local data directory: GLUE TSVs, WikiText-2, Tiny Shakespeare (default $SPARSE_NLP_DATA_DIR, then the Hub)",
    )
    p.add_argument(
        "--start-from",
        default=None,
        help="an already fine-tuned model folder: skip the recipe's finetune stages and start from it",
    )
    p.add_argument(
        "--resume", action="store_true", help="resume training stages from their latest checkpoint"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--device",
        default="auto",
        help="where to train: auto (a CUDA GPU when torch sees one, else CPU), cpu, cuda or cuda:N",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="override the recipe's seed (repeat a run with other seeds; the saved recipe.yaml records it)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from ..recipes import load_recipe, run_recipe

    recipe = load_recipe(args.recipe)
    if args.seed is not None:
        recipe.seed = args.seed
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    results = run_recipe(
        recipe,
        args.out,
        data_dir=args.data_dir,
        start_from=args.start_from,
        resume=args.resume,
        progress=not args.no_progress,
        device=args.device,
    )
    print(json.dumps(results, indent=2))
    return 0
