"""Train a tiny GPT-2 on Tiny Shakespeare: the decoder testbed for quality numbers (no pretrained decoder offline).

    python benchmarks/train_tiny_gpt2.py --data-dir ../shared/data --out runs/tiny-gpt2

The tokenizer is a byte-level BPE trained here on the training split (so any text, e.g. SST-2 calibration
sentences, tokenizes without unknowns). The model is a plain `GPT2LMHeadModel` with ``n_positions=1024``;
most steps train on short windows and the last part on full 1024-token windows, so every position embedding
is trained. The last 10% of the text is held out; ``results.json`` records its perplexity at context 256
and 1024 (non-overlapping windows). The output folder loads with `AutoTokenizer` / `AutoModelForCausalLM`.

Other scripts call `train(out_dir, data_dir)` when the folder is absent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tokenizers import ByteLevelBPETokenizer  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402

from sparse_nlp.evaluation.data import load_text  # noqa: E402

DEFAULT_OUT = "runs/tiny-gpt2"  # under the working directory (git-ignored /runs/)
EOS = "<|endoftext|>"
HELD_OUT_FRACTION = 0.1


def split_text(text: str) -> tuple[str, str]:
    """Training text and the held-out last 10% (cut at a line boundary)."""
    cut = int(len(text) * (1 - HELD_OUT_FRACTION))
    cut = text.rfind("\n", 0, cut) + 1 or cut
    return text[:cut], text[cut:]


def build_tokenizer(train_text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the training text, wrapped as a normal HF fast tokenizer."""
    bpe = ByteLevelBPETokenizer()
    lines = train_text.splitlines(keepends=True)
    bpe.train_from_iterator(
        lines, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )
    tok.model_max_length = 1024
    return tok


@torch.no_grad()
def perplexity(model: GPT2LMHeadModel, ids: torch.Tensor, context: int, batch_size: int = 8) -> float:
    """Perplexity of a 1-D token stream over non-overlapping windows of `context` tokens."""
    model.eval()
    n = (ids.numel() - 1) // context
    windows = ids[: n * context].view(n, context)  # (n, T)
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        batch = windows[start : start + batch_size]
        out = model(input_ids=batch, labels=batch)
        tokens = batch.numel() - batch.shape[0]
        total += out.loss.item() * tokens
        count += tokens
    return math.exp(total / count)


def train(
    out_dir: str | os.PathLike = DEFAULT_OUT,
    data_dir: str | os.PathLike | None = None,
    *,
    steps: int = 160,
    long_steps: int = 16,
    seq_len: int = 256,
    long_seq_len: int = 1024,
    tokens_per_step: int = 4096,
    lr: float = 2e-3,
    n_embd: int = 192,
    n_layer: int = 4,
    n_head: int = 6,
    vocab_size: int = 1024,
    seed: int = 0,
    log_every: int = 25,
    threads: int | None = None,
) -> dict:
    """Train the tiny GPT-2 and save model, tokenizer and ``results.json`` to `out_dir`.

    Args:
        out_dir: Output folder (created).
        data_dir: Data directory holding ``tinyshakespeare/input.txt`` (default ``$SPARSE_NLP_DATA_DIR``).
        steps: Optimizer steps in total; the last `long_steps` use `long_seq_len` windows.
        seq_len: Window length of the first steps.
        long_seq_len: Window length of the last steps (and ``n_positions``).
        tokens_per_step: Tokens per optimizer step (batch = tokens_per_step // window).
        lr: Peak AdamW learning rate (linear warm-up 50 steps, cosine decay to 10%).
        n_embd, n_layer, n_head: Model size.
        vocab_size: BPE vocabulary size.
        seed: Random seed.
        log_every: Print the training loss every this many steps.
        threads: torch intra-op threads (None: torch's default). On a busy shared machine 1 is much faster.

    Returns:
        The results dict also written to ``results.json``.
    """
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    out = Path(out_dir)
    train_text, held_text = split_text(load_text("tinyshakespeare", "train", data_dir))
    tokenizer = build_tokenizer(train_text, vocab_size)
    train_ids = torch.tensor(tokenizer(train_text)["input_ids"], dtype=torch.long)
    held_ids = torch.tensor(tokenizer(held_text)["input_ids"], dtype=torch.long)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=long_seq_len,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = 50

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        window = long_seq_len if step >= steps - long_steps else seq_len
        batch_size = max(1, tokens_per_step // window)
        starts = torch.randint(0, train_ids.numel() - window - 1, (batch_size,), generator=g)
        batch = torch.stack([train_ids[s : s + window] for s in starts.tolist()])  # (B, T)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(
                f"step {step:5d}  window {window:4d}  loss {loss.item():.3f}  {time.perf_counter() - start:6.0f} s",
                flush=True,
            )
    train_seconds = time.perf_counter() - start
    results = {
        "parameters": params,
        "train_tokens": train_ids.numel(),
        "held_out_tokens": held_ids.numel(),
        "held_out_perplexity_256": perplexity(model, held_ids, 256),
        "held_out_perplexity_1024": perplexity(model, held_ids, 1024, batch_size=2),
        "steps": steps,
        "long_steps": long_steps,
        "seq_len": seq_len,
        "long_seq_len": long_seq_len,
        "tokens_per_step": tokens_per_step,
        "train_seconds": round(train_seconds, 1),
        "config": {
            "n_embd": n_embd,
            "n_layer": n_layer,
            "n_head": n_head,
            "vocab_size": len(tokenizer),
            "n_positions": long_seq_len,
        },
        "held_out": f"last {HELD_OUT_FRACTION:.0%} of tinyshakespeare/input.txt (from character {len(train_text)})",
    }
    results["held_out_perplexity"] = results["held_out_perplexity_256"]
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def held_out_ids(tokenizer, data_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """Token ids of the held-out last 10% of Tiny Shakespeare (the text `train` never trains on)."""
    _, held_text = split_text(load_text("tinyshakespeare", "train", data_dir))
    return torch.tensor(tokenizer(held_text)["input_ids"], dtype=torch.long)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="data directory (default $SPARSE_NLP_DATA_DIR)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--long-steps", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--tokens-per-step", type=int, default=4096)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    args = p.parse_args()
    results = train(
        args.out,
        args.data_dir,
        steps=args.steps,
        long_steps=args.long_steps,
        seq_len=args.seq_len,
        tokens_per_step=args.tokens_per_step,
        lr=args.lr,
        seed=args.seed,
        threads=args.threads,
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
