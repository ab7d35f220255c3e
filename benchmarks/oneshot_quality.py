"""One-shot pruning quality: method x pattern x sparsity on MiniLM (STS-B) and the tiny GPT-2 (perplexity).

    python benchmarks/oneshot_quality.py --data-dir ../shared/data --json runs/oneshot/quality.json

Every row prunes a fresh copy of each model with `sparse_nlp.sparsify` (all encoder/decoder Linear layers of
the blocks, per-layer budgets; Wanda compares within rows) and reports MiniLM STS-B dev Spearman x100 (mean
pooling, cosine) and the tiny GPT-2's held-out Tiny Shakespeare perplexity (context 256), with the wall time
of each pruning call. Calibration: the first ``--num-samples`` SST-2 train sentences (MiniLM) and Tiny
Shakespeare training windows (GPT-2), ``--seq-len`` tokens at most. The dense row comes first. The tiny GPT-2
is trained by ``benchmarks/train_tiny_gpt2.py`` when ``--gpt2`` does not exist.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from sparse_nlp import SparsityConfig, WeightSparsity, sparsify  # noqa: E402
from sparse_nlp.evaluation.data import calibration_texts  # noqa: E402
from sparse_nlp.evaluation.embeddings import stsb_scores  # noqa: E402
from sparse_nlp.models import load_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny_gpt2 import DEFAULT_OUT, held_out_ids  # noqa: E402

# (method, pattern, sparsity, profile, options)
# most informative rows first, so a run cut short still answers the main questions
DEFAULT_ROWS = [
    ("magnitude", "unstructured", 0.5, "uniform", {}),
    ("wanda", "unstructured", 0.5, "uniform", {}),
    ("sparsegpt", "unstructured", 0.5, "uniform", {}),
    ("wanda", "2:4", 0.5, "uniform", {}),
    ("sparsegpt", "2:4", 0.5, "uniform", {}),
    ("wanda", "4:8", 0.5, "uniform", {}),
    ("sparsegpt", "4:8", 0.5, "uniform", {}),
    ("wanda", "unstructured", 0.7, "uniform", {}),
    ("sparsegpt", "unstructured", 0.7, "uniform", {}),
    ("wanda", "unstructured", 0.7, "owl", {}),
    ("sparsegpt", "unstructured", 0.7, "owl", {}),
    ("wanda", "unstructured", 0.8, "uniform", {}),
    ("sparsegpt", "unstructured", 0.8, "uniform", {}),
    ("wanda", "unstructured", 0.8, "owl", {}),
    ("sparsegpt", "unstructured", 0.8, "owl", {}),
    ("magnitude", "unstructured", 0.7, "uniform", {}),
    ("magnitude", "unstructured", 0.8, "uniform", {}),
    ("magnitude", "2:4", 0.5, "uniform", {}),
    ("magnitude", "4:8", 0.5, "uniform", {}),
]
# SparseGPT refitting each layer to the dense model's outputs (option match_dense), alone and with OWL
TUNED_ROWS = [
    ("sparsegpt", "unstructured", 0.5, "uniform", {"match_dense": True}),
    ("sparsegpt", "2:4", 0.5, "uniform", {"match_dense": True}),
    ("sparsegpt", "4:8", 0.5, "uniform", {"match_dense": True}),
    ("sparsegpt", "unstructured", 0.7, "uniform", {"match_dense": True}),
    ("sparsegpt", "unstructured", 0.8, "uniform", {"match_dense": True}),
    ("sparsegpt", "unstructured", 0.7, "owl", {"match_dense": True}),
    ("sparsegpt", "unstructured", 0.8, "owl", {"match_dense": True}),
]


def parse_row(text: str) -> tuple:
    """``method,pattern,sparsity[,profile[,key=value...]]`` -> a row."""
    parts = text.split(",")
    options = {}
    for kv in parts[4:]:
        key, value = kv.split("=", 1)
        options[key] = json.loads(value)
    return (parts[0], parts[1], float(parts[2]), parts[3] if len(parts) > 3 else "uniform", options)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, context: int = 256, batch_size: int = 16) -> float:
    """Perplexity over non-overlapping windows of `context` tokens."""
    model.eval()
    n = (ids.numel() - 1) // context
    windows = ids[: n * context].view(n, context)  # (n, T)
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        batch = windows[start : start + batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        total += loss.item() * (batch.numel() - batch.shape[0])
        count += batch.numel() - batch.shape[0]
    return math.exp(total / count)


def gpt2_calibration(tokenizer, args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    """``--num-samples`` windows of ``--seq-len`` tokens spread evenly over the training 90% of Tiny Shakespeare."""
    from train_tiny_gpt2 import split_text

    from sparse_nlp.evaluation.data import load_text

    train_text, _ = split_text(load_text("tinyshakespeare", "train", args.data_dir))
    ids = torch.tensor(tokenizer(train_text)["input_ids"], dtype=torch.long)
    starts = torch.linspace(0, ids.numel() - args.seq_len - 1, args.num_samples).long()
    return [{"input_ids": torch.stack([ids[s : s + args.seq_len] for s in starts.tolist()])}]  # (N, T)


def config_for(method: str, pattern: str, sparsity: float, profile: str, options: dict) -> SparsityConfig:
    return SparsityConfig(
        weights=[
            WeightSparsity(
                method=method, sparsity=sparsity, pattern=pattern, profile=profile, options=options
            )
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="data directory (default $SPARSE_NLP_DATA_DIR)")
    p.add_argument(
        "--gpt2", default=DEFAULT_OUT, help=f"tiny GPT-2 folder (default {DEFAULT_OUT}); trained if absent"
    )
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument(
        "--row",
        action="append",
        default=[],
        help="method,pattern,sparsity[,profile[,key=json...]] (repeatable)",
    )
    p.add_argument(
        "--tuned", action="store_true", help="append the tuned rows (SparseGPT match_dense, with OWL)"
    )
    p.add_argument(
        "--timing-only", action="store_true", help="time the pruning calls (wall and CPU), skip evaluation"
    )
    p.add_argument(
        "--skip-dense", action="store_true", help="leave out the dense row (for extra tuning runs)"
    )
    p.add_argument("--skip-gpt2", action="store_true", help="MiniLM only")
    p.add_argument("--skip-minilm", action="store_true", help="tiny GPT-2 only")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [parse_row(r) for r in args.row] or DEFAULT_ROWS
    if args.tuned:
        rows = rows + TUNED_ROWS

    minilm_calib = calibration_texts("sst2", data_dir=args.data_dir, limit=args.num_samples)
    models = {}
    if not args.skip_minilm:
        models["minilm"] = (lambda: load_model("minilm"), minilm_calib)
    if not args.skip_gpt2:
        if not (Path(args.gpt2) / "config.json").is_file():
            from train_tiny_gpt2 import train

            train(args.gpt2, args.data_dir)
        gpt2_calib = gpt2_calibration(load_model(args.gpt2, task="causal-lm")[1], args)
        models["gpt2"] = (lambda: load_model(args.gpt2, task="causal-lm"), gpt2_calib)
        held = held_out_ids(load_model(args.gpt2, task="causal-lm")[1], args.data_dir)

    def evaluate(name, model, tok) -> float:
        if name == "minilm":
            return stsb_scores(model, tok, data_dir=args.data_dir)["spearman"]
        return perplexity(model, held)

    results = []
    header = f"{'method':<10} {'pattern':<12} {'sparsity':>8} {'profile':<8} {'STS-B':>7} {'prune s':>8} {'GPT-2 ppl':>10} {'prune s':>8}"
    print(header)
    print("-" * len(header))
    for row in ([] if args.skip_dense else [("dense", "-", 0.0, "-", {})]) + rows:
        method, pattern, sparsity, profile, options = row
        result = {
            "method": method,
            "pattern": pattern,
            "sparsity": sparsity,
            "profile": profile,
            "options": options,
        }
        for name, (load, calib) in models.items():
            model, tok = load()
            seconds = cpu = 0.0
            if method != "dense":
                start, start_cpu = time.perf_counter(), time.process_time()
                sparsify(
                    model,
                    config_for(method, pattern, sparsity, profile, options),
                    data=calib,
                    tokenizer=tok,
                    num_samples=args.num_samples,
                    seq_len=args.seq_len,
                    progress=False,
                )
                seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
            result[name] = float("nan") if args.timing_only else evaluate(name, model, tok)
            result[f"{name}_prune_seconds"] = round(seconds, 2)
            result[f"{name}_prune_cpu_seconds"] = round(cpu, 2)
            if args.timing_only:
                print(
                    f"{name}: {method} {pattern} {sparsity} {profile} {options}: {seconds:.1f} s wall, {cpu:.1f} s CPU"
                )
        label = pattern if pattern != "unstructured" else "unstr."
        opts = " " + ",".join(f"{k}={v}" for k, v in options.items()) if options else ""
        print(
            f"{method:<10} {label:<12} {sparsity:>8.2f} {profile + opts:<8} "
            f"{result.get('minilm', float('nan')):>7.2f} {result.get('minilm_prune_seconds', 0):>8.1f} "
            f"{result.get('gpt2', float('nan')):>10.2f} {result.get('gpt2_prune_seconds', 0):>8.1f}",
            flush=True,
        )
        results.append(result)
        if args.json:  # after every row, so a run cut short keeps what it measured
            write_json(args, results)


def write_json(args: argparse.Namespace, results: list[dict]) -> None:
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "num_samples": args.num_samples,
        "seq_len": args.seq_len,
        "load_average": os.getloadavg(),
        "torch_threads": torch.get_num_threads(),
        "rows": results,
    }
    Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
