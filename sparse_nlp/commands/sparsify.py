"""``sparse-nlp sparsify MODEL --method magnitude --sparsity 0.5 --targets ffn --out DIR``."""

from __future__ import annotations

import argparse
import json
import time

from ..errors import ConfigError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sparsify",
        help="prune a model and save it as a sparse checkpoint",
        description="Prune MODEL (a folder, a Hub id, or an alias: minilm, smollm2) and save it to --out.",
    )
    p.add_argument("model", help="local folder, Hub id, or alias (minilm, smollm2)")
    p.add_argument("--out", required=True, help="output folder for the sparse checkpoint")
    p.add_argument("--method", default="magnitude", help="pruning method (default: magnitude)")
    p.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help="fraction of weights removed, in [0, 1) (default 0.5; fixed by N:M)",
    )
    p.add_argument(
        "--pattern", default="unstructured", help='"unstructured", "N:M" (e.g. 2:4) or "block:RxC"'
    )
    p.add_argument("--scope", default="per-layer", help="per-layer, per-row or global (default: per-layer)")
    p.add_argument(
        "--targets",
        default="all-linear",
        help="comma-separated groups (attention, ffn, all-linear) or re:<regex>",
    )
    p.add_argument(
        "--exclude", action="append", default=[], help="regex of module names to keep dense (repeatable)"
    )
    p.add_argument("--profile", default="uniform", help="per-layer sparsity profile: uniform or owl")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option (JSON value), repeatable",
    )
    p.add_argument("--config", help="a SparsityConfig JSON file (replaces the options above)")
    p.add_argument(
        "--targets-file",
        help="a ModelTargets JSON file giving the model's layout (for a family outside the targets table)",
    )
    p.add_argument(
        "--calibration",
        help="calibration texts: a GLUE task (sst2, ...), wikitext2, tinyshakespeare, or a .txt file",
    )
    p.add_argument(
        "--calibration-cut",
        choices=["random", "even", "lines"],
        default=None,
        help="how a corpus (wikitext2: its valid split, tinyshakespeare, a .txt file) becomes samples: windows of "
        "--seq-len tokens at seeded random offsets (default) or evenly spaced, or its non-blank lines (GLUE tasks "
        "always give sentences)",
    )
    p.add_argument("--calibration-seed", type=int, default=0, help="seed of random windows (default 0)")
    p.add_argument("--data-dir", help="local data directory (default: $SPARSE_NLP_DATA_DIR, then the Hub)")
    p.add_argument("--num-samples", type=int, default=128, help="calibration samples (default 128)")
    p.add_argument("--seq-len", type=int, default=128, help="calibration sequence length (default 128)")
    p.add_argument(
        "--offload-dir",
        default=None,
        help="sequential onloading: keep the blocks on disk in this folder and prune them one at a time "
        "(peak memory: the embeddings, one block and the calibration activations); the checkpoint is then "
        "written block by block from this folder (not with --compact)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--compact",
        action="store_true",
        help="save in the compact format (smaller; loads only through sparse_nlp)",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a checkpoint's own Python code to run (off by default: such checkpoints are refused)",
    )
    p.set_defaults(func=run)


def _options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"error: --option {pair!r} must look like KEY=VALUE")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def build_config(args: argparse.Namespace):
    from ..config import SparsityConfig, WeightSparsity
    from ..pruning.patterns import NM, parse_pattern

    if args.config:
        return SparsityConfig.load(args.config)
    sparsity = args.sparsity
    if sparsity is None:
        pattern = parse_pattern(args.pattern)
        sparsity = pattern.sparsity if isinstance(pattern, NM) else 0.5
    rule = WeightSparsity(
        method=args.method,
        sparsity=sparsity,
        pattern=args.pattern,
        scope=args.scope,
        targets=[t.strip() for t in args.targets.split(",") if t.strip()],
        exclude=args.exclude,
        profile=args.profile,
        options=_options(args.option),
    )
    return SparsityConfig(weights=[rule]).validate()


def calibration_data(args: argparse.Namespace):
    """The calibration data the flags ask for: corpus windows (`CorpusWindows`) or a list of texts; None without
    --calibration. Files are checked here, before any model is loaded."""
    if not args.calibration:
        if args.calibration_cut is not None:
            raise ConfigError("--calibration-cut needs --calibration.")
        return None
    from ..evaluation.data import GLUE_TASKS, calibration_texts
    from ..pruning.calibration import CorpusWindows, corpus_text

    if args.calibration in GLUE_TASKS:
        if args.calibration_cut not in (None, "lines"):
            raise ConfigError(
                f"--calibration {args.calibration} gives sentences; --calibration-cut {args.calibration_cut} "
                "needs a corpus (wikitext2, tinyshakespeare or a .txt file)."
            )
        return calibration_texts(args.calibration, data_dir=args.data_dir, limit=args.num_samples)
    cut = args.calibration_cut or "random"
    if cut == "lines":
        return calibration_texts(args.calibration, data_dir=args.data_dir, limit=args.num_samples)
    corpus_text(args.calibration, args.data_dir)  # a missing or unknown corpus fails before the model loads
    return CorpusWindows(args.calibration, cut=cut, seed=args.calibration_seed, data_dir=args.data_dir)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import save_pretrained
    from ..models import load_model
    from ..report import report
    from ..sparsify import sparsify

    config = build_config(args)  # all argument errors surface before anything is loaded or written
    if args.offload_dir and args.compact:
        raise ConfigError(
            "--compact cannot be combined with --offload-dir (the checkpoint is streamed block by block); "
            "save without --compact, then run `sparse-nlp compact` on the saved folder."
        )
    targets = None
    if args.targets_file:
        from ..targets import ModelTargets

        targets = ModelTargets.load(args.targets_file)
    data = calibration_data(args)
    if args.offload_dir:
        from ..pruning.onloading import load_offloaded

        model, tokenizer = load_offloaded(args.model, args.offload_dir)
    else:
        model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code)
    start = time.perf_counter()
    sparsify(
        model,
        config,
        data=data,
        tokenizer=tokenizer,
        progress=not args.no_progress,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        targets=targets,
    )
    seconds = time.perf_counter() - start
    if config.attention is not None and config.attention.max_positions and tokenizer is not None:
        from ..attention.long_context import token_positions

        # the saved tokenizer truncates to the extended length, not the pretrained one
        tokenizer.model_max_length = token_positions(model)
    out = save_pretrained(model, args.out, tokenizer=tokenizer, compact=args.compact)
    result = report(model)
    print(result)
    print(f"\npruned in {seconds:.1f} s; saved to {out}")
    return 0
