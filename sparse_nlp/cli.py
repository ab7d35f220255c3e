"""The ``sparse-nlp`` command. Each sub-command lives in `sparse_nlp.commands.<name>`."""

from __future__ import annotations

import argparse
import logging
import sys

from .commands import bench, compact, evaluate, push, report, run, sparsify
from .errors import USER_ERRORS
from .version import __version__

COMMANDS = [sparsify, report, evaluate, run, bench, compact, push]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-nlp",
        description="Make Hugging Face transformer models sparse and keep them sparse.",
    )
    parser.add_argument("--version", action="version", version=f"sparse-nlp {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
