"""Sparse attention speed and memory against dense SDPA, measured side by side in one run.

Setting: fp32, batch 1, 12 heads x 64, window 256 (128 on each side) + 1 global token (position 0).

- forward at N = 1024 / 2048 / 4096 / 8192: dense SDPA, the blocked kernel, and (with --flex) compiled flex;
- forward + backward at N = 4096: dense SDPA vs the blocked kernel;
- peak memory of forward + backward against N (each in a fresh process: growth of peak RSS over the inputs);
- end-to-end MiniLM forward at 4096 tokens after long-context conversion: dense SDPA vs sparse attention, and
  the model with an attention that costs nothing (the ceiling of any attention kernel end to end).

Timings alternate dense and sparse call by call and report medians, because the machine is shared.

    HF_HUB_OFFLINE=1 python benchmarks/attention_speed.py --out runs/attn/speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparse_nlp.attention.kernels import native
from sparse_nlp.attention.kernels.blocked import blocked_attention
from sparse_nlp.attention.kernels.flex import flex_attention_kernel
from sparse_nlp.attention.patterns import GlobalTokens, SlidingWindow
from sparse_nlp.attention.spec import MaskSpec

HEADS, DIM = 12, 64


def pattern(window: int):
    return SlidingWindow(window) | GlobalTokens((0,))


def spec_for(n: int, window: int, block: int) -> MaskSpec:
    pos = torch.arange(n)
    return MaskSpec(pattern(window), "blocked", 1, pos, pos, block_size=block)


def alternate(fns: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, calling them in turn `repeats` times (after `warmup` rounds)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def qkv(n: int, grad: bool = False):
    g = torch.Generator().manual_seed(n)
    return [torch.randn(1, HEADS, n, DIM, generator=g, requires_grad=grad) for _ in range(3)]


def forward_rows(args) -> list[dict]:
    rows = []
    scale = DIM**-0.5
    for n in args.lengths:
        rows.append(_forward_row(args, n, scale))
    return rows


def _forward_row(args, n: int, scale: float) -> dict:
    q, k, v = qkv(n)
    # a fresh spec per call: the blocked kernel's masks are rebuilt every time (in a model they are built
    # once per forward pass and shared by all layers)
    fns = {
        "dense_sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "blocked": lambda: blocked_attention(q, k, v, spec_for(n, args.window, args.block), scale),
    }
    if native.usable(q):  # the same kernel with its forward through torch's flash op instead (native off)
        fns["blocked_flash_path"] = lambda: _flash_path(
            blocked_attention, q, k, v, spec_for(n, args.window, args.block), scale
        )
    if args.flex:
        # compile and BlockMask outside the timing
        flex_attention_kernel(q, k, v, spec_for(n, args.window, args.block), scale)
        fns["flex"] = lambda: flex_attention_kernel(q, k, v, spec_for(n, args.window, args.block), scale)
    with torch.no_grad():
        t = alternate(fns, args.repeats)
    row = {"N": n, **{f"{name}_ms": round(sec * 1000, 2) for name, sec in t.items()}}
    row.update(
        {
            f"{name}_speedup": round(t["dense_sdpa"] / sec, 2)
            for name, sec in t.items()
            if name != "dense_sdpa"
        }
    )
    print(json.dumps(row), flush=True)
    return row


def _flash_path(fn, *args):
    with native.turned_off():
        return fn(*args)


def backward_row(args) -> dict:
    n = args.train_length
    scale = DIM**-0.5
    q, k, v = qkv(n, grad=True)
    w = torch.randn(1, HEADS, n, DIM)

    def dense():
        (F.scaled_dot_product_attention(q, k, v) * w).sum().backward()

    def sparse():
        (blocked_attention(q, k, v, spec_for(n, args.window, args.block), scale) * w).sum().backward()

    fns = {"dense_sdpa": dense, "blocked": sparse}
    if native.usable(q):  # the same kernel with its forward through torch's flash op (native off)
        fns["blocked_flash_path"] = lambda: _flash_path(sparse)
    t = alternate(fns, args.repeats)
    row = {"N": n, "fwd_bwd": True, **{f"{name}_ms": round(sec * 1000, 2) for name, sec in t.items()}}
    row.update(
        {
            f"{name}_speedup": round(t["dense_sdpa"] / sec, 2)
            for name, sec in t.items()
            if name != "dense_sdpa"
        }
    )
    print(json.dumps(row), flush=True)
    return row


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(kind: str, n: int, window: int, block: int) -> None:
    """Runs in a fresh process: peak RSS growth (MiB) of one forward + backward beyond the inputs."""
    q, k, v = qkv(n, grad=True)
    spec = spec_for(n, window, block)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _rss_mib("VmRSS")
    if kind == "dense_sdpa":
        out = F.scaled_dot_product_attention(q, k, v)
    elif kind == "reference_masked":
        from sparse_nlp.attention.kernels.reference import reference_attention

        out = reference_attention(q, k, v, spec, DIM**-0.5)
    else:
        out = blocked_attention(q, k, v, spec, DIM**-0.5)
    out.sum().backward()
    print(_rss_mib("VmHWM") - before)


def memory_rows(args) -> list[dict]:
    rows = []
    for n in args.memory_lengths:
        row = {"N": n}
        for kind in ("dense_sdpa", "reference_masked", "blocked"):
            cmd = [
                sys.executable,
                __file__,
                "--memory-child",
                kind,
                str(n),
                str(args.window),
                str(args.block),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row[f"{kind}_peak_extra_mib"] = round(float(out.stdout.strip().splitlines()[-1]), 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


NO_ATTENTION = "bench_no_attention"


def minilm_row(args) -> dict:
    from transformers import AttentionInterface

    from sparse_nlp.attention import apply_attention, remove_attention
    from sparse_nlp.attention.long_context import extend_positions
    from sparse_nlp.config import AttentionSparsity
    from sparse_nlp.evaluation.data import load_text
    from sparse_nlp.models import load_model

    model, tokenizer = load_model("minilm", task="base")
    model.eval()
    n = args.minilm_length
    extend_positions(model, n)
    text = (
        load_text("wikitext2", split="test", data_dir=args.data_dir) if args.data_dir else "hello world " * n
    )
    ids = tokenizer(text[: n * 8], return_tensors="pt", truncation=True, max_length=n)["input_ids"]
    ids = ids[:, :n]
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    sparse_cfg = AttentionSparsity(
        "union",
        {
            "patterns": [
                {"pattern": "sliding_window", "options": {"window": args.window}},
                {"pattern": "global_tokens", "options": {"positions": [0]}},
            ]
        },
        kernel="blocked",
        block_size=args.block,
    )

    def dense():
        remove_attention(model)
        model.set_attn_implementation("sdpa")
        model(**x)

    def sparse():
        apply_attention(model, sparse_cfg)
        model(**x)

    def sparse_flash_path():  # the blocked kernel with the native kernel turned off
        with native.turned_off():
            sparse()

    # the rest of the model alone: an "attention" that costs nothing (it returns the values) bounds what any
    # attention kernel can gain end to end, dense time / this time
    AttentionInterface.register(NO_ATTENTION, lambda module, q, k, v, mask, **kw: (v.transpose(1, 2), None))

    def no_attention():
        remove_attention(model)
        model.set_attn_implementation(NO_ATTENTION)
        model(**x)

    with torch.no_grad():
        fns = {"dense_sdpa": dense, "sparse": sparse, "no_attention": no_attention}
        if native.usable(
            torch.zeros(1, HEADS, 1, model.config.hidden_size // model.config.num_attention_heads)
        ):
            fns["sparse_flash_path"] = sparse_flash_path
        t = alternate(fns, args.repeats)
        # where the sparse pass spends its attention time: one profiled forward (profiling adds a little)
        with torch.profiler.profile() as prof:
            sparse()
    flash = "aten::_scaled_dot_product_flash_attention_for_cpu"
    band_ops = (flash, "sparse_nlp::band_forward")
    events = prof.key_averages(group_by_input_shape=True)
    kernel_us = sum(e.cpu_time_total for e in events if e.key == "_BandAttention")
    band_us = max((e.self_cpu_time_total for e in events if e.key in band_ops), default=0)
    remove_attention(model)
    model.set_attn_implementation("sdpa")
    row = {
        "model": "minilm",
        "N": int(ids.shape[1]),
        "dense_sdpa_ms": round(t["dense_sdpa"] * 1000, 1),
        "sparse_ms": round(t["sparse"] * 1000, 1),
        "no_attention_ms": round(t["no_attention"] * 1000, 1),
        "sparse_flash_path_ms": round(t["sparse_flash_path"] * 1000, 1) if "sparse_flash_path" in t else None,
        "native_kernel": native.status(),
        # profiled: the blocked kernel over all layers, and within it the band's flash-attention calls
        "profiled_kernel_ms": round(kernel_us / 1000, 1),
        "profiled_band_ms": round(band_us / 1000, 1),
    }
    row["sparse_speedup"] = round(t["dense_sdpa"] / t["sparse"], 2)
    row["ceiling_speedup"] = round(t["dense_sdpa"] / t["no_attention"], 2)
    if "sparse_flash_path" in t:
        row["sparse_flash_path_speedup"] = round(t["dense_sdpa"] / t["sparse_flash_path"], 2)
    print(json.dumps(row), flush=True)
    return row


def _cpu_model() -> str:
    """The CPU's model name (Linux), else platform.processor()."""
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        memory_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--train-length", type=int, default=4096)
    p.add_argument("--memory-lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--minilm-length", type=int, default=4096)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--block", type=int, default=0, help="blocked-kernel query block (0: default)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--flex", action="store_true", help="also time compiled flex_attention (compiles per length)"
    )
    p.add_argument("--skip", nargs="*", default=[], choices=["forward", "backward", "memory", "minilm"])
    p.add_argument("--data-dir", default=os.environ.get("SPARSE_NLP_DATA_DIR"))
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {
        "setting": {k: v for k, v in vars(args).items() if k != "out"},
        "torch_threads": torch.get_num_threads(),
    }
    result["setting"]["out"] = str(args.out) if args.out else None
    result["machine"] = {
        "cpu": _cpu_model(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_kernel": native.status(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result["machine"]), flush=True)
    if "forward" not in args.skip:
        result["forward"] = forward_rows(args)
    if "backward" not in args.skip:
        result["forward_backward"] = backward_row(args)
    if "memory" not in args.skip:
        result["memory"] = memory_rows(args)
    if "minilm" not in args.skip:
        result["minilm"] = minilm_row(args)
    result["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps({"load_average_after": result["machine"]["load_average_after"]}), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
