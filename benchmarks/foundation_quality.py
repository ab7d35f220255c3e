"""Magnitude pruning of all-MiniLM-L6-v2: STS-B dev Spearman against sparsity (the foundation's quality check).

    python benchmarks/foundation_quality.py --data-dir ../shared/data [--json out.json]

Prunes every encoder Linear layer (attention + FFN) per row at each sparsity and scores mean-pooled
cosine similarities on STS-B dev. Prints a markdown table; every row is measured in this run.
"""

from __future__ import annotations

import argparse
import json
import time

import sparse_nlp
from sparse_nlp.evaluation.embeddings import stsb_scores
from sparse_nlp.models import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--sparsities", default="0.3,0.5,0.7")
    p.add_argument("--scope", default="per-row")
    p.add_argument("--json", dest="json_path")
    args = p.parse_args()

    rows = []
    for sparsity in [0.0] + [float(s) for s in args.sparsities.split(",")]:
        model, tokenizer = load_model("minilm")
        start = time.perf_counter()
        if sparsity:
            sparse_nlp.sparsify(
                model, sparse_nlp.SparsityConfig.magnitude(sparsity, scope=args.scope), progress=False
            )
        prune_s = time.perf_counter() - start
        scores = stsb_scores(model, tokenizer, data_dir=args.data_dir)
        linear = sparse_nlp.report(model).groups["linear"].sparsity
        rows.append({"sparsity": sparsity, "linear_sparsity": linear, "prune_seconds": prune_s, **scores})

    print(
        f"| magnitude ({args.scope}) | sparsity of all Linear weights | STS-B dev Spearman | prune time (s) |"
    )
    print("| --- | --- | --- | --- |")
    for r in rows:
        name = "dense" if r["sparsity"] == 0 else f"{r['sparsity']:.0%}"
        print(f"| {name} | {r['linear_sparsity']:.2%} | {r['spearman']:.2f} | {r['prune_seconds']:.2f} |")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
