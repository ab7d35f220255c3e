"""Quality of sinks + window attention on a decoder: held-out perplexity at context 1024, dense vs sparse.

The tiny GPT-2 of `benchmarks/train_tiny_gpt2.py` (trained by that script into --model when the folder is
absent) is evaluated on the held-out last 10% of Tiny Shakespeare in non-overlapping 1024-token windows:

1. dense attention (as trained);
2. StreamingLLM sinks + window (window 256, 4 sinks) without any training;
3. the same pattern after a short fine-tune with the pattern switched on (the blocked kernel trains);
4. control: the dense model fine-tuned for the same steps (so the gain of 3 is not just more training).

    HF_HUB_OFFLINE=1 python benchmarks/attention_quality.py --data-dir ../shared/data --out runs/attn/quality.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from sparse_nlp.attention import apply_attention  # noqa: E402
from sparse_nlp.config import AttentionSparsity  # noqa: E402
from sparse_nlp.evaluation.data import load_text  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_tiny_gpt2  # noqa: E402


def fine_tune(
    model, train_ids: torch.Tensor, *, steps: int, context: int, batch: int, lr: float, seed: int
) -> list[float]:
    """AdamW steps on random `context`-token windows of the training text; returns the losses."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        starts = torch.randint(0, train_ids.numel() - context - 1, (batch,), generator=g)
        x = torch.stack([train_ids[s : s + context] for s in starts.tolist()])  # (B, T)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 10)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(round(loss.item(), 4))
    model.eval()
    return losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default=train_tiny_gpt2.DEFAULT_OUT, help="tiny GPT-2 folder (trained when absent)"
    )
    p.add_argument("--data-dir", default=os.environ.get("SPARSE_NLP_DATA_DIR"))
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--steps", type=int, default=60, help="fine-tuning steps")
    p.add_argument("--batch", type=int, default=4, help="windows of --context tokens per step")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-control", action="store_true", help="skip the dense fine-tune control")
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        print(f"{model_dir} is absent: training it with benchmarks/train_tiny_gpt2.py", flush=True)
        cmd = [sys.executable, str(HERE / "train_tiny_gpt2.py"), "--out", str(model_dir)]
        if args.data_dir:
            cmd += ["--data-dir", str(args.data_dir)]
        subprocess.run(cmd, check=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dense = AutoModelForCausalLM.from_pretrained(model_dir)
    dense.eval()
    held = train_tiny_gpt2.held_out_ids(tokenizer, args.data_dir)
    train_text, _ = train_tiny_gpt2.split_text(load_text("tinyshakespeare", "train", args.data_dir))
    train_ids = torch.tensor(tokenizer(train_text)["input_ids"], dtype=torch.long)
    pattern = AttentionSparsity("sink_window", {"window": args.window, "sinks": args.sinks})

    def ppl(model) -> float:
        return round(train_tiny_gpt2.perplexity(model, held, args.context, batch_size=2), 3)

    rows = []
    t0 = time.perf_counter()
    rows.append({"model": "dense", "attention": "dense", "perplexity": ppl(dense)})
    print(json.dumps(rows[-1]), flush=True)
    sparse = copy.deepcopy(dense)
    apply_attention(sparse, pattern)
    rows.append(
        {
            "model": "dense",
            "attention": f"sinks {args.sinks} + window {args.window}",
            "perplexity": ppl(sparse),
        }
    )
    print(json.dumps(rows[-1]), flush=True)
    t_ft = time.perf_counter()
    losses = fine_tune(
        sparse,
        train_ids,
        steps=args.steps,
        context=args.context,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
    )
    sparse_seconds = time.perf_counter() - t_ft
    rows.append(
        {
            "model": f"fine-tuned {args.steps} steps with the sparse pattern",
            "attention": f"sinks {args.sinks} + window {args.window}",
            "perplexity": ppl(sparse),
            "fine_tune_seconds": round(sparse_seconds, 1),
            "first_last_loss": [losses[0], losses[-1]],
        }
    )
    print(json.dumps(rows[-1]), flush=True)
    if not args.no_control:
        control = copy.deepcopy(dense)
        t_ft = time.perf_counter()
        losses = fine_tune(
            control,
            train_ids,
            steps=args.steps,
            context=args.context,
            batch=args.batch,
            lr=args.lr,
            seed=args.seed,
        )
        rows.append(
            {
                "model": f"control: fine-tuned {args.steps} steps dense",
                "attention": "dense",
                "perplexity": ppl(control),
                "fine_tune_seconds": round(time.perf_counter() - t_ft, 1),
                "first_last_loss": [losses[0], losses[-1]],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "setting": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "held_out_tokens": int(held.numel()),
        "held_out_windows": int((held.numel() - 1) // args.context),
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(f"| model | attention | held-out perplexity (context {args.context}) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['attention']} | {r['perplexity']:.2f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
