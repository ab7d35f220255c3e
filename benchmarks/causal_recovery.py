"""Run a causal-LM recipe (default: ``recipes/smollm2-wikitext2-24-recover.yaml``) and record how it ran.

Writes ``OUT/benchmark.json``: the recipe's results (per stage: steps, wall seconds, perplexity with its
protocol, measured sparsity), the process's peak resident memory, the CPU model, torch threads, the load
average before and after every stage, the date and the commit; prints the Markdown rows of the results page.

    python benchmarks/causal_recovery.py --data-dir DATA --out runs/smollm2-24-recover --threads 2
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
    args = p.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())
