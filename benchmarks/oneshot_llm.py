"""One-shot pruning of a pretrained decoder (default: the ``smollm2`` alias, SmolLM2-135M-Instruct).

The table of the Wanda and SparseGPT papers: method (magnitude, wanda, sparsegpt) x pattern (50/60/70%
unstructured, 2:4, 4:8) x profile (uniform, owl), every linear layer of every block pruned, scored by
WikiText-2 *test* perplexity (non-overlapping windows of 1,024 tokens, the first ``--max-windows``), with the
dense model as the first row and every row's ratio to it. Calibration: ``--samples`` random windows of
``--seq-len`` tokens from WikiText-2 *valid* (the papers: 128 x 2,048).

Each cell runs in its own subprocess, so its peak resident memory (``ru_maxrss``) is its own; prune time is the
``sparsify`` call alone. Rows are appended to ``--out`` (JSON lines) as they finish, so an interrupted run keeps
what it measured; ``--table`` prints the Markdown table of such a file.

Sequential onloading (``--offload-dir``) against the in-memory pass: run a prune-only cell each way with
``--eval-skip --save-dir``; each row records the peak resident memory after loading, after pruning and after
saving the checkpoint (an offloaded model is saved block by block), and ``--compare A B`` checks that the two
checkpoints are the same file for file.

    python benchmarks/oneshot_llm.py --data-dir DATA --max-windows 8 --samples 32 --seq-len 512 \\
        --methods magnitude,wanda,sparsegpt --patterns 0.5,2:4 --profiles uniform --out oneshot_llm.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_cell(args: argparse.Namespace) -> dict:
    """Load, prune (unless dense), score; one JSON-able row."""
    import torch

    torch.set_num_threads(args.threads)
    from sparse_nlp import SparsityConfig, WeightSparsity, sparsify
    from sparse_nlp.evaluation.perplexity import evaluate_perplexity, perplexity_text
    from sparse_nlp.models import load_model
    from sparse_nlp.pruning.calibration import CorpusWindows

    method, pattern, profile = args.cell.split(",")
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB after the imports
    if args.offload_dir and method != "dense":
        from sparse_nlp.pruning.onloading import load_offloaded

        model, tokenizer = load_offloaded(args.model, args.offload_dir)
    else:
        model, tokenizer = load_model(args.model, task="causal-lm")
    row: dict = {
        "method": method,
        "pattern": pattern,
        "profile": profile,
        "import_rss_mib": round(baseline, 1),
        "load_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if method != "dense":
        nm = ":" in pattern
        kept, group = (int(x) for x in pattern.split(":")) if nm else (0, 1)
        rule = WeightSparsity(
            method=method,
            sparsity=1 - kept / group if nm else float(pattern),
            pattern=pattern if nm else "unstructured",
            profile=profile,
            targets=["all-linear"],
        )
        data = CorpusWindows("wikitext2", cut="random", seed=args.seed, data_dir=args.data_dir)
        start = time.perf_counter()
        sparsify(
            model,
            SparsityConfig(weights=[rule]),
            data=data,
            tokenizer=tokenizer,
            num_samples=args.samples,
            seq_len=args.seq_len,
            progress=False,
        )
        row["prune_seconds"] = round(time.perf_counter() - start, 1)
        # peak of loading and pruning, before the evaluation needs the whole model in memory
        row["prune_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        row["offloaded"] = bool(args.offload_dir)
        if args.save_dir:
            from sparse_nlp import save_pretrained

            # an offloaded model is saved block by block from the offload folder (never whole in memory)
            start = time.perf_counter()
            save_pretrained(model, args.save_dir, tokenizer=tokenizer)
            row["save_seconds"] = round(time.perf_counter() - start, 1)
            row["save_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        if args.offload_dir and (args.save_weights or not args.eval_skip):
            from sparse_nlp.pruning.onloading import onload_all

            onload_all(model)
        if args.save_weights:
            from safetensors.torch import save_file

            state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
            for name, module in model.named_modules():
                if "weight_mask" in module._buffers:
                    state[f"{name}.weight_mask"] = module._buffers["weight_mask"]
            save_file(state, args.save_weights)
    if args.eval_skip:
        row["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return row
    text, source = perplexity_text("wikitext2", split="test", data_dir=args.data_dir)
    start = time.perf_counter()
    result = evaluate_perplexity(
        model, tokenizer, text, context=args.context, max_windows=args.max_windows, progress=False
    )
    row.update(
        perplexity=round(result["perplexity"], 3),
        eval_seconds=round(time.perf_counter() - start, 1),
        windows=result["windows"],
        scored_tokens=result["scored_tokens"],
        context=result["context"],
        stride=result["stride"],
        data_file=source["data_file"],
        peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )
    return row


def checkpoint_files(folder: Path) -> dict[str, bytes]:
    """Every file of a checkpoint with the per-save fields neutral: the save id blanked, config.json's hashes
    dropped, safetensors ``__metadata__`` sorted (the library writes it in no fixed order)."""
    config = json.loads((folder / "config.json").read_text())
    meta = config.get("sparse_nlp", {})
    save_id = meta.pop("save_id", "").encode()
    meta.pop("sha256", None)
    files = {"config.json": json.dumps(config, sort_keys=True).encode()}
    for path in sorted(folder.iterdir()):
        if path.name == "config.json":
            continue
        data = path.read_bytes()
        if save_id:
            data = data.replace(save_id, b"0" * len(save_id))
        if path.suffix == ".safetensors":
            n = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + n])
            header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
            data = json.dumps(header).encode() + b"|" + data[8 + n :]
        files[path.name] = data
    return files


def cells(args: argparse.Namespace) -> list[str]:
    out = ["dense,-,-"] if not args.no_dense else []
    for pattern in args.patterns.split(","):
        for method in args.methods.split(","):
            for profile in args.profiles.split(","):
                if profile == "owl" and ":" in pattern:
                    continue  # N:M fixes every layer's sparsity; OWL cannot vary it
                out.append(f"{method},{pattern},{profile}")
    return out


def table(rows: list[dict]) -> str:
    dense = next((r["perplexity"] for r in rows if r["method"] == "dense"), None)
    lines = [
        "| method | pattern | profile | perplexity | x dense | prune s | prune peak RSS MiB | peak RSS MiB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "perplexity" not in r:
            continue  # a prune-only row (--eval-skip)
        pattern = (
            r["pattern"] if r["pattern"] in ("-",) or ":" in r["pattern"] else f"{float(r['pattern']):.0%}"
        )
        ratio = f"{r['perplexity'] / dense:.2f}" if dense else "-"
        lines.append(
            f"| {r['method']} | {pattern} | {r['profile']} | {r['perplexity']:.2f} | {ratio} | "
            f"{r.get('prune_seconds', '-')} | {r.get('prune_peak_rss_mib', '-')} | {r['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data-dir", default=os.environ.get("SPARSE_NLP_DATA_DIR"))
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    p.add_argument(
        "--patterns", default="0.5,0.6,0.7,2:4,4:8", help="sparsities (unstructured) and N:M patterns"
    )
    p.add_argument("--profiles", default="uniform,owl")
    p.add_argument("--samples", type=int, default=128, help="calibration windows (papers: 128)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per calibration window (papers: 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--max-windows", type=int, default=40, help="perplexity over the first N test windows")
    p.add_argument("--threads", type=int, default=torch_threads_default())
    p.add_argument("--offload-dir", default=None, help="prune with sequential onloading through this folder")
    p.add_argument("--no-dense", action="store_true", help="skip the dense row")
    p.add_argument("--eval-skip", action="store_true", help="prune only (for the memory comparison)")
    p.add_argument("--save-weights", default=None, help="write the pruned state to this safetensors file")
    p.add_argument(
        "--save-dir", default=None, help="save the pruned checkpoint here (peak RSS measured after the save)"
    )
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        help="print whether two checkpoints saved with --save-dir are the same file for file and exit",
    )
    p.add_argument("--out", default="oneshot_llm.jsonl", help="rows are appended here (JSON lines)")
    p.add_argument("--table", action="store_true", help="print the table of --out and exit")
    p.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one cell, print its row
    args = p.parse_args()
    if args.compare:
        same = checkpoint_files(Path(args.compare[0])) == checkpoint_files(Path(args.compare[1]))
        print(f"checkpoints {'identical' if same else 'DIFFER'} (save ids and header metadata order aside)")
        return 0 if same else 1
    if args.cell:
        print("ROW " + json.dumps(run_cell(args)), flush=True)
        return 0
    out = Path(args.out)
    if args.table:
        print(table([json.loads(line) for line in out.read_text().splitlines() if line.strip()]))
        return 0
    header = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cpu": cpu_model(),
        "threads": args.threads,
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(header), flush=True)
    rows = []
    for cell in cells(args):
        command = [sys.executable, __file__, *sys.argv[1:], "--cell", cell]
        proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if proc.returncode != 0 or not found:
            print(f"cell {cell} failed:\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
            continue
        row = json.loads(found[-1])
        row["loadavg"] = [round(x, 2) for x in os.getloadavg()]
        rows.append(row)
        with out.open("a") as f:
            f.write(json.dumps({**row, "run": header}) + "\n")
        print(json.dumps(row), flush=True)
    print(table(rows))
    return 0


def torch_threads_default() -> int:
    return max(1, min(os.cpu_count() or 1, 2))


if __name__ == "__main__":
    sys.exit(main())
