"""``sparse-nlp push DIR ORG/NAME``: upload a sparse checkpoint with a generated model card."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "push",
        help="upload a sparse checkpoint and its generated model card to the Hub",
        description=(
            "Upload the checkpoint folder DIR (written by sparse-nlp sparsify / save_pretrained) to the Hub "
            "repository ORG/NAME in one commit, with a model card stating the measured sparsity. The folder "
            "is checked first and never modified. Exactly the checkpoint's files (config.json and the files its "
            "manifest lists) are uploaded, never pickles; --include adds more. Set HF_TOKEN (and HF_ENDPOINT "
            "for another Hub)."
        ),
    )
    p.add_argument("folder", metavar="DIR", help="checkpoint folder")
    p.add_argument("repo_id", metavar="ORG/NAME", help="Hub repository (created if missing)")
    p.add_argument("--base-model", help="Hub id of the dense model it was made from (for the card)")
    p.add_argument("--dataset", action="append", default=[], help="Hub id of a data set used (repeatable)")
    p.add_argument(
        "--evaluation",
        help="evaluation JSON (default: evaluation.json / eval_results.json / results.json in DIR)",
    )
    p.add_argument(
        "--benchmark",
        help="benchmark result JSON with a speedup (default: benchmark.json / speed.json in DIR)",
    )
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--revision", help="branch to commit to (default: main)")
    p.add_argument(
        "--create-pr", action="store_true", help="open a pull request instead of committing to the branch"
    )
    p.add_argument("--commit-message", help="commit message")
    p.add_argument(
        "--no-card", action="store_true", help="upload the folder's own README.md instead of a generated card"
    )
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="also upload files matching this glob (relative to DIR; repeatable; pickles are refused)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave out files that --include added (repeatable; the checkpoint's own files cannot be left out)",
    )
    p.add_argument("--card-out", help="write the generated card to this file and upload nothing (a dry run)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..checkpoint import from_pretrained, verify_checkpoint
    from ..hub import default_evaluation, push_files, push_to_hub, render_model_card

    if args.card_out:
        verify_checkpoint(args.folder)
        files = push_files(args.folder, include=args.include, exclude=args.exclude)
        raw = (Path(args.folder) / "config.json").read_text()
        card = render_model_card(
            from_pretrained(args.folder),
            args.repo_id,
            base_model=args.base_model,
            datasets=args.dataset or None,
            evaluation=args.evaluation or default_evaluation(Path(args.folder)),
            benchmark=args.benchmark or _default(args.folder, ("benchmark.json", "speed.json")),
            compact='"compact"' in raw,
            files=[(f, (Path(args.folder) / f).stat().st_size) for f in files],
        )
        Path(args.card_out).write_text(str(card))
        print(f"wrote the model card to {args.card_out}; nothing was uploaded")
        return 0
    result = push_to_hub(
        args.folder,
        args.repo_id,
        base_model=args.base_model,
        datasets=args.dataset or None,
        evaluation=args.evaluation,
        benchmark=args.benchmark,
        commit_message=args.commit_message,
        private=args.private or None,
        revision=args.revision,
        create_pr=args.create_pr,
        card=not args.no_card,
        include=args.include,
        exclude=args.exclude,
    )
    print(f"pushed {len(result.files)} files to {result.repo_id}: {result.commit_url}")
    return 0


def _default(folder: str, names: tuple[str, ...]):
    from pathlib import Path

    return next((Path(folder) / n for n in names if (Path(folder) / n).is_file()), None)
