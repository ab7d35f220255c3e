"""Make a one-shot sparse MiniLM, measure it, and write its model card into model_cards/ (nothing is uploaded).

Measures, in one run: STS-B dev Spearman of mean-pooled embeddings (dense and sparse) and the forward speed
of the sparse model against the dense one (alternating, same process). Saves the checkpoint to --out with
``evaluation.json`` and ``benchmark.json`` beside it (so ``sparse-nlp push --out`` picks them up) and renders
the card exactly as ``push_to_hub`` would.

    HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 python benchmarks/minilm_card.py --pattern 2:4 --sparsity 0.5 \
        --compact --out runs/ckpt/minilm-magnitude-2of4 --repo-id sparse-nlp/all-MiniLM-L6-v2-magnitude-2of4 \
        --card model_cards/all-MiniLM-L6-v2-magnitude-2of4.md --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import sparse_nlp
from sparse_nlp.evaluation.embeddings import stsb_scores
from sparse_nlp.evaluation.speed import compare_speed
from sparse_nlp.hub import render_model_card
from sparse_nlp.models import load_model

BASE = "sentence-transformers/all-MiniLM-L6-v2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--compact", action="store_true")
    parser.add_argument("--out", required=True)
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--card", required=True)
    parser.add_argument("--data-dir", default=os.environ.get("SPARSE_NLP_DATA_DIR"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()

    dense, tokenizer = load_model("minilm")
    model, _ = load_model("minilm")
    rule = sparse_nlp.WeightSparsity(
        method="magnitude", sparsity=args.sparsity, pattern=args.pattern, targets=["all-linear"]
    )
    sparse_nlp.sparsify(model, sparse_nlp.SparsityConfig(weights=[rule]), progress=False)
    dense_scores = stsb_scores(dense, tokenizer, data_dir=args.data_dir)
    scores = stsb_scores(model, tokenizer, data_dir=args.data_dir)
    rows = compare_speed(
        {"dense": dense, "sparse": model},
        batches=[args.batch],
        seqs=[args.seq],
        warmup=2,
        repeats=8,
        reference="dense",
    )
    ratio = next(r.ratio for r in rows if r.model == "sparse")
    out = sparse_nlp.save_pretrained(model, args.out, tokenizer=tokenizer, compact=args.compact)
    evaluation = {
        "task": "stsb",
        "split": "dev",
        "spearman": scores["spearman"],
        "pearson": scores["pearson"],
        "pairs": scores["pairs"],
        "note": f"mean-pooled embeddings, cosine; dense {BASE}: spearman {dense_scores['spearman']:.2f}",
    }
    benchmark = {
        "vs": BASE,
        "speedup": [{"batch": args.batch, "seq": args.seq, "ratio": ratio}],
        "loadavg": list(os.getloadavg()),
    }
    (out / "evaluation.json").write_text(json.dumps(evaluation, indent=2) + "\n")
    (out / "benchmark.json").write_text(json.dumps(benchmark, indent=2) + "\n")
    card = render_model_card(
        model, args.repo_id, base_model=BASE, evaluation=evaluation, benchmark=benchmark, compact=args.compact
    )
    Path(args.card).write_text(str(card))  # the YAML front matter must come first: the command goes to stdout
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    print(
        json.dumps(
            {"dense": dense_scores, "sparse": scores, "speed_ratio": ratio, "loadavg": benchmark["loadavg"]},
            indent=2,
        )
    )
    print(f"card: {args.card}; checkpoint: {out}; command: {command}")


if __name__ == "__main__":
    main()
