"""Run a causal-LM recipe (default: ``recipes/smollm2-wikitext2-24-recover.yaml``) and record how it ran.

Writes ``OUT/benchmark.json``: the recipe's results (per stage: steps, wall seconds, perplexity with its
protocol, measured sparsity), the process's peak resident memory, the CPU model, torch threads, the load
average before and after every stage, the date and the commit; prints the Markdown rows of the results page.

    python benchmarks/causal_recovery.py --data-dir DATA --out runs/smollm2-24-recover --threads 2

``--checkpoint DIR`` scores a Trainer checkpoint a training stage wrote (``OUT/<stage>/trainer/checkpoint-N``)
under the protocol of the recipe's last evaluate stage, with the recipe's starting model's tokenizer, and checks
that its pruned weights still hold the pattern of the one-shot stage's checkpoint (``--pattern-from DIR``):
a run cut short by a time budget is still measured, as what it is (N steps of a longer schedule).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from oneshot_llm import cpu_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-wikitext2-24-recover.yaml"))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint", default=None, help="score this Trainer checkpoint instead of running")
    p.add_argument("--pattern-from", default=None, help="with --checkpoint: the one-shot stage's checkpoint")
    args = p.parse_args(argv)
    if args.checkpoint:
        return score_checkpoint(args, argv)

    import logging

    import torch

    from sparse_nlp.recipes import load_recipe, run_recipe

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    load_before = os.getloadavg()
    print(f"load average before: {load_before}", flush=True)
    start = time.perf_counter()
    results = run_recipe(recipe, args.out, data_dir=args.data_dir, progress=False, device="cpu")
    record = {
        "command": "python " + " ".join(["benchmarks/causal_recovery.py", *(argv or sys.argv[1:])]),
        "recipe": Path(args.recipe).name,
        "cpu": cpu_model(),
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "commit": commit,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "results": results,
    }
    Path(args.out, "benchmark.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"load average after: {record['load_after']}; peak RSS {record['peak_rss_mib']} MiB")
    for stage in results["stages"]:
        print(
            "|",
            stage["name"],
            "|",
            stage.get("steps", "-"),
            "|",
            stage.get("wall_seconds"),
            "|",
            round(stage["perplexity"], 2) if "perplexity" in stage else "-",
            "|",
            stage.get("block_sparsity", "-"),
            "|",
        )
    return 0


def score_checkpoint(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Perplexity of a Trainer checkpoint (weights only) under the recipe's protocol; zeros checked."""
    import torch
    from safetensors.torch import load_file

    from sparse_nlp import from_pretrained
    from sparse_nlp.evaluation.causal import evaluate_text, load_causal_lm
    from sparse_nlp.recipes import load_recipe

    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe)
    protocol = [s for s in recipe.stages if s.type == "evaluate"][-1].perplexity
    load_before = os.getloadavg()
    model, tokenizer = load_causal_lm(recipe.model, recipe.task)
    state = load_file(str(Path(args.checkpoint) / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise SystemExit(
            f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    same_zeros = None
    if args.pattern_from:
        pruned = from_pretrained(args.pattern_from)
        reference = dict(pruned.named_parameters())
        same_zeros = all(
            torch.equal(reference[n] == 0, p == 0)
            for n, p in model.named_parameters()
            if ".layers." in n and p.dim() == 2
        )
    start = time.perf_counter()
    result = evaluate_text(
        model,
        tokenizer,
        recipe.task,
        split=None,
        data_dir=args.data_dir,
        context=protocol.context,
        stride=protocol.stride,
        max_windows=protocol.max_windows,
        progress=False,
    )
    record = {
        "command": "python " + " ".join(["benchmarks/causal_recovery.py", *(argv or sys.argv[1:])]),
        "checkpoint": Path(args.checkpoint).name,
        "same_zeros_as_oneshot": same_zeros,
        "cpu": cpu_model(),
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "eval_seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "result": result,
    }
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
