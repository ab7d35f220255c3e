"""``sparse-nlp compact DIR --out OUT``: write a compact copy of a sparse checkpoint."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compact",
        help="write a compact (smaller, sparse_nlp-only) copy of a sparse checkpoint",
        description=(
            "Store the masked weights of the sparse checkpoint DIR as packed bitmask + kept values (N:M weights "
            "as values + small indices) in --out. It loads bit-exact with sparse_nlp.from_pretrained; plain "
            "transformers refuses it with an error naming sparse_nlp. DIR is not modified."
        ),
    )
    p.add_argument("folder", metavar="DIR", help="dense sparse checkpoint folder")
    p.add_argument("--out", required=True, help="output folder for the compact checkpoint")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..checkpoint import compact_checkpoint

    out = compact_checkpoint(args.folder, args.out)
    before = sum(p.stat().st_size for p in Path(args.folder).iterdir() if p.is_file())
    after = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(
        f"wrote {out}: {after / 1e6:.1f} MB (the dense folder has {before / 1e6:.1f} MB, ratio {after / before:.3f})"
    )
    return 0
