"""Sparse attention kernels against dense SDPA on a CUDA GPU, measured side by side in one run.

Same setting as `attention_speed.py`: fp32, batch 1, 12 heads x 64, window 256 + 1 global token.
On a GPU the blocked kernel runs its masked-SDPA path (torch's flash op for the band is CPU-only), dense SDPA
runs a fused GPU kernel, and the flex kernel is compiled `flex_attention` (inference only). This script answers
which of them `auto` should pick there:

- forward at N = 1,024 ... 16,384: dense SDPA, the blocked kernel, the flex kernel (medians of CUDA-event timings);
- forward + backward at N = 4,096: dense SDPA vs the blocked kernel;
- the largest difference of each kernel from the reference (SDPA with the dense boolean mask) up to 8,192.

TF32 stays off (fp32 products in full precision). Without a CUDA GPU it exits with status 2.

    python benchmarks/attention_speed_gpu.py --out runs/attn/speed_gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from sparse_nlp.attention.kernels.blocked import blocked_attention
from sparse_nlp.attention.kernels.flex import flex_attention_kernel
from sparse_nlp.attention.kernels.reference import reference_attention
from sparse_nlp.attention.patterns import GlobalTokens, SlidingWindow
from sparse_nlp.attention.spec import MaskSpec

HEADS, DIM = 12, 64
REFERENCE_MAX = 8192  # the reference kernel materialises an N x N mask: checked up to this length


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of `fn` on the GPU, by CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def row(n: int, window: int, repeats: int, backward: bool) -> dict:
    generator = torch.Generator(device="cuda").manual_seed(n)
    q, k, v = (torch.randn(1, HEADS, n, DIM, device="cuda", generator=generator) for _ in range(3))
    pos = torch.arange(n, device="cuda")
    pattern = SlidingWindow(window) | GlobalTokens((0,))
    spec = MaskSpec(pattern, "blocked", 1, pos, pos)
    scale = DIM**-0.5
    out: dict = {"N": n}
    with torch.no_grad():
        kernels = {
            "dense_sdpa": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale),
            "blocked": lambda: blocked_attention(q, k, v, spec, scale),
            "flex": lambda: flex_attention_kernel(q, k, v, spec, scale),
        }
        if n <= REFERENCE_MAX:
            ref = reference_attention(q, k, v, spec, scale)
            for name in ("blocked", "flex"):
                out[f"{name}_max_error"] = (kernels[name]() - ref).abs().max().item()
            del ref
        for name, fn in kernels.items():
            out[f"{name}_ms"] = median_ms(fn, repeats)
    for name in ("blocked", "flex"):
        out[f"{name}_speedup"] = round(out["dense_sdpa_ms"] / out[f"{name}_ms"], 2)
    if backward:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        weight = torch.randn(q.shape, device="cuda", generator=generator)

        def dense_step():
            (F.scaled_dot_product_attention(*leaves, scale=scale) * weight).sum().backward()

        def blocked_step():
            (blocked_attention(*leaves, spec, scale) * weight).sum().backward()

        out["train_dense_sdpa_ms"] = median_ms(dense_step, repeats)
        out["train_blocked_ms"] = median_ms(blocked_step, repeats)
        out["train_blocked_speedup"] = round(out["train_dense_sdpa_ms"] / out["train_blocked_ms"], 2)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--train-length", type=int, default=4096)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, help="JSON file for the rows")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("attention_speed_gpu.py needs a CUDA GPU (torch sees none); attention_speed.py times the CPU.")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, window {args.window} + 1 global, fp32")
    for n in args.lengths:
        r = row(n, args.window, args.repeats, backward=n == args.train_length)
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(f"{'N':>6} {'dense ms':>9} {'blocked':>16} {'flex':>16} {'train blocked':>14}")
    for r in rows:
        train = f"{r['train_blocked_speedup']:.2f}x" if "train_blocked_speedup" in r else ""
        print(
            f"{r['N']:>6} {r['dense_sdpa_ms']:>9.3f} {r['blocked_ms']:>8.3f} ({r['blocked_speedup']:>5.2f}x)"
            f" {r['flex_ms']:>8.3f} ({r['flex_speedup']:>5.2f}x) {train:>14}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
