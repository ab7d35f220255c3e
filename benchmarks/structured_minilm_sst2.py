"""Structured pruning of MiniLM fine-tuned on SST-2: heads and FFN neurons removed gradually (Taylor scores)
with distillation from the dense teacher; SST-2 dev accuracy against measured CPU throughput.

Two sub-commands:

    # one budget: gradual removal + recovery, then dev accuracy; saves the pruned checkpoint and results.json
    python benchmarks/structured_minilm_sst2.py run --teacher runs/minilm-sst2-dense \
        --data-dir ../shared/data --heads 0.5 --ffn 0.5 --out runs/structured/h50-f50

    # every run against the dense teacher: reload each checkpoint with sparse_nlp.from_pretrained, re-check
    # its accuracy, time all models side by side in one process (batch 32, seq 128), write table + plot
    python benchmarks/structured_minilm_sst2.py summarize --teacher runs/minilm-sst2-dense \
        --data-dir ../shared/data --runs runs/structured/* --out benchmarks/results
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

import sparse_nlp  # noqa: E402
from sparse_nlp.checkpoint import from_pretrained, save_pretrained  # noqa: E402
from sparse_nlp.config import StructuredSparsity  # noqa: E402
from sparse_nlp.evaluation.data import load_glue_rows  # noqa: E402
from sparse_nlp.evaluation.speed import compare_speed, format_table  # noqa: E402
from sparse_nlp.structured import model_layout  # noqa: E402
from sparse_nlp.structured.recovery import RecoveryConfig, gradual_structured_prune  # noqa: E402
from sparse_nlp.training.distillation import DistillationConfig  # noqa: E402


def encode(tokenizer, rows, max_length):
    enc = tokenizer(rows["text"], truncation=True, max_length=max_length)
    return [(enc["input_ids"][i], rows["label"][i]) for i in range(len(rows["label"]))]


def collate(items, pad_id):
    length = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for i, (seq, _) in enumerate(items):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([y for _, y in items])}


def endless(examples, batch_size, pad_id, seed):
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([examples[i] for i in order[start : start + batch_size]], pad_id)


@torch.inference_mode()
def accuracy(model, examples, pad_id, batch_size=64):
    model.eval()
    correct = 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id)
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return 100.0 * correct / len(examples)


def params(model):
    return sum(p.numel() for p in model.parameters())


def cmd_run(args):
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher)
    student = copy.deepcopy(teacher)
    train = encode(tokenizer, load_glue_rows("sst2", "train", args.data_dir), args.max_length)
    dev = encode(tokenizer, load_glue_rows("sst2", "dev", args.data_dir), args.max_length)
    batches = endless(train, args.batch_size, tokenizer.pad_token_id, args.seed)
    target = StructuredSparsity(heads=args.heads, ffn=args.ffn, score=args.score, scope=args.scope)
    cfg = RecoveryConfig(
        stages=args.stages,
        steps_per_stage=args.steps_per_stage,
        final_steps=args.final_steps,
        lr=args.lr,
        score_batches=args.score_batches,
        distill=DistillationConfig(
            temperature=args.temperature, alpha=args.alpha, hidden_weight=args.hidden_weight
        ),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def on_log(entry):
        entry["elapsed_s"] = round(time.perf_counter() - start, 1)
        print(json.dumps(entry), flush=True)

    log = gradual_structured_prune(student, teacher, batches, target, cfg, on_log=on_log)
    acc = accuracy(student, dev, tokenizer.pad_token_id)
    save_pretrained(student, out / "model", tokenizer=tokenizer)
    result = {
        "heads": args.heads,
        "ffn": args.ffn,
        "dev_accuracy": acc,
        "params": params(student),
        "teacher_params": params(teacher),
        "layers": [vars(lay) for lay in model_layout(student)],
        "train_examples_seen": cfg.total_steps * args.batch_size,
        "epoch_fraction": round(cfg.total_steps * args.batch_size / len(train), 3),
        "wall_s": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
        "command": " ".join([sys.executable, *sys.argv]),
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "log": log,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("log", "layers")}, indent=2))


def cmd_summarize(args):
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    dev = encode(tokenizer, load_glue_rows("sst2", "dev", args.data_dir), args.max_length)
    teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher)
    dense_acc = accuracy(teacher, dev, tokenizer.pad_token_id)
    models = {"dense": teacher}
    rows = []
    for run in sorted(args.runs):
        res_file = Path(run) / "results.json"
        if not res_file.is_file():
            print(f"skipping {run}: no results.json (still running?)", file=sys.stderr)
            continue
        res = json.loads(res_file.read_text())
        model = from_pretrained(Path(run) / "model")
        reloaded = accuracy(model, dev, tokenizer.pad_token_id)
        name = Path(run).name
        models[name] = model
        rows.append(
            {
                "run": name,
                **{
                    k: res[k]
                    for k in ("heads", "ffn", "dev_accuracy", "params", "epoch_fraction", "wall_s", "layers")
                },
                "recovery_steps": res["train_examples_seen"] // res["args"]["batch_size"],
                "reloaded_accuracy": reloaded,
            }
        )
    load_before = os.getloadavg()
    speed = compare_speed(
        models,
        batches=[args.bench_batch],
        seqs=[args.bench_seq],
        warmup=args.warmup,
        repeats=args.repeats,
        threads=args.threads,
        reference="dense",
    )
    load_after = os.getloadavg()
    print(format_table(speed))
    by_name = {r.model: r for r in speed}
    for row in rows:
        row["throughput_ratio"] = by_name[row["run"]].ratio
        row["median_ms"] = by_name[row["run"]].median_ms
        row["accuracy_drop"] = dense_acc - row["dev_accuracy"]
    rows.sort(key=lambda r: r["throughput_ratio"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "dense_dev_accuracy": dense_acc,
        "dense_params": params(teacher),
        "dense_median_ms": by_name["dense"].median_ms,
        "bench": {
            "batch": args.bench_batch,
            "seq": args.bench_seq,
            "threads": torch.get_num_threads() if not args.threads else args.threads,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "runs": rows,
        "speed": [r.to_dict() for r in speed],
        "command": " ".join([sys.executable, *sys.argv]),
    }
    (out / "structured_minilm_sst2.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"Dense MiniLM-L6 (SST-2 fine-tuned): dev accuracy {dense_acc:.2f}, {params(teacher) / 1e6:.1f}M parameters, "
        f"{by_name['dense'].median_ms:.0f} ms per batch of {args.bench_batch} x {args.bench_seq} tokens.",
        "",
        "| run | heads removed | FFN removed | params (M) | recovery steps (epoch) | wall (min) | dev acc. "
        "| reloaded acc. | vs dense (pts) | throughput ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['heads']:.0%} | {r['ffn']:.0%} | {r['params'] / 1e6:.1f} | "
            f"{r['recovery_steps']} ({r['epoch_fraction']:.2f}) | {r['wall_s'] / 60:.0f} | {r['dev_accuracy']:.2f} | "
            f"{r['reloaded_accuracy']:.2f} | {-r['accuracy_drop']:+.2f} | {r['throughput_ratio']:.2f}x |"
        )
    lines.append("")
    lines.append(
        f"Load average (1/5/15 min) before timing {load_before[0]:.1f}/{load_before[1]:.1f}/{load_before[2]:.1f}, "
        f"after {load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f}; models timed alternately in one process."
    )
    (out / "structured_minilm_sst2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the plot needs matplotlib: pip install sparse-nlp[bench]") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        [1.0] + [r["throughput_ratio"] for r in rows],
        [dense_acc] + [r["dev_accuracy"] for r in rows],
        "o-",
        label="structured (heads + FFN)",
    )
    for r in rows:
        ax.annotate(
            r["run"],
            (r["throughput_ratio"], r["dev_accuracy"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.axhline(dense_acc - 1.0, color="grey", ls="--", lw=0.8, label="dense - 1.0 pt")
    ax.axhline(dense_acc - 2.5, color="grey", ls=":", lw=0.8, label="dense - 2.5 pts")
    ax.axvline(2.0, color="tab:green", ls="--", lw=0.8)
    ax.axvline(3.0, color="tab:red", ls=":", lw=0.8)
    ax.set_xlabel(f"CPU throughput vs dense (batch {args.bench_batch}, seq {args.bench_seq})")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_title("MiniLM-L6 on SST-2: structured pruning + distillation")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "structured_minilm_sst2.png", dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--teacher", required=True)
    r.add_argument("--data-dir", default=None)
    r.add_argument("--out", required=True)
    r.add_argument("--heads", type=float, required=True)
    r.add_argument("--ffn", type=float, required=True)
    r.add_argument("--score", default="taylor", choices=["taylor", "weight-norm", "movement"])
    r.add_argument("--scope", default="global", choices=["global", "per-layer"])
    r.add_argument("--stages", type=int, default=3)
    r.add_argument("--steps-per-stage", type=int, default=100)
    r.add_argument("--final-steps", type=int, default=300)
    r.add_argument("--score-batches", type=int, default=8)
    r.add_argument("--lr", type=float, default=1e-4)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--max-length", type=int, default=64)
    r.add_argument("--temperature", type=float, default=2.0)
    r.add_argument("--alpha", type=float, default=0.9)
    r.add_argument("--hidden-weight", type=float, default=0.0)
    r.add_argument("--seed", type=int, default=42)
    r.set_defaults(func=cmd_run)
    s = sub.add_parser("summarize")
    s.add_argument("--teacher", required=True)
    s.add_argument("--data-dir", default=None)
    s.add_argument("--runs", nargs="+", required=True)
    s.add_argument("--out", default="benchmarks/results")
    s.add_argument("--max-length", type=int, default=64)
    s.add_argument("--bench-batch", type=int, default=32)
    s.add_argument("--bench-seq", type=int, default=128)
    s.add_argument("--warmup", type=int, default=3)
    s.add_argument("--repeats", type=int, default=15)
    s.add_argument("--threads", type=int, default=None)
    s.set_defaults(func=cmd_summarize)
    args = p.parse_args()
    print(f"sparse_nlp {sparse_nlp.__version__}, torch threads {torch.get_num_threads()}", flush=True)
    args.func(args)


if __name__ == "__main__":
    main()
