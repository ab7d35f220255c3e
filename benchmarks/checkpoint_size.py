"""Checkpoint size: dense (default) vs compact format for MiniLM pruned with magnitude on all Linear layers.

For each setting it prints the dense weight file size, the compact weight file size, the ratio for the
pruned Linear weights alone and for the whole weight file, the whole checkpoint folder sizes, and save / load
times, and checks that the compact checkpoint loads bit-exact (logits and every tensor).

    HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 python benchmarks/checkpoint_size.py --out runs/ckpt/size.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import sparse_nlp
from sparse_nlp.compact import COMPACT_FILE, compact_stats
from sparse_nlp.models import load_model

SETTINGS = [  # (label, pattern, sparsity, dtype)
    ("50% unstructured fp32", "unstructured", 0.5, torch.float32),
    ("90% unstructured fp32", "unstructured", 0.9, torch.float32),
    ("2:4 fp32", "2:4", 0.5, torch.float32),
    ("2:4 fp16", "2:4", 0.5, torch.float16),
]


def folder_bytes(folder: Path, names: tuple[str, ...] = ()) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and (not names or p.name in names))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_setting(label, pattern, sparsity, dtype, model_name, work: Path) -> dict:
    model, tokenizer = load_model(model_name)
    rule = sparse_nlp.WeightSparsity(
        method="magnitude", sparsity=sparsity, pattern=pattern, targets=["all-linear"]
    )
    sparse_nlp.sparsify(model, sparse_nlp.SparsityConfig(weights=[rule]), progress=False)
    model.to(dtype).eval()
    inputs = tokenizer(
        ["a sparse checkpoint should be small", "and load back exactly"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
    dense_dir, compact_dir = work / "dense", work / "compact"
    _, save_dense_s = timed(lambda: sparse_nlp.save_pretrained(model, dense_dir, tokenizer=tokenizer))
    _, save_compact_s = timed(
        lambda: sparse_nlp.save_pretrained(model, compact_dir, tokenizer=tokenizer, compact=True)
    )
    loaded_dense, load_dense_s = timed(lambda: sparse_nlp.from_pretrained(dense_dir, dtype=dtype))
    loaded, load_compact_s = timed(lambda: sparse_nlp.from_pretrained(compact_dir, dtype=dtype))
    with torch.no_grad():
        out = loaded(**inputs).last_hidden_state
    a, b = model.state_dict(), loaded.state_dict()
    exact = torch.equal(ref, out) and all(torch.equal(a[k], b[k]) for k in a)
    dense_file = (dense_dir / "model.safetensors").stat().st_size
    compact_file = (compact_dir / COMPACT_FILE).stat().st_size
    weights = ("model.safetensors", "sparse_masks.safetensors", COMPACT_FILE)
    stats = compact_stats(compact_dir / COMPACT_FILE)
    masked_dense, masked_stored, encodings = (
        stats["sparse_dense_bytes"],
        stats["sparse_stored_bytes"],
        stats["encodings"],
    )
    report = sparse_nlp.report(model)
    del loaded_dense
    return {
        "setting": label,
        "linear_sparsity": report.groups["linear"].sparsity,
        "dense_file_bytes": dense_file,
        "compact_file_bytes": compact_file,
        "file_ratio": compact_file / dense_file,
        "pruned_linear_dense_bytes": masked_dense,
        "pruned_linear_compact_bytes": masked_stored,
        "pruned_linear_ratio": masked_stored / masked_dense,
        "dense_weights_with_masks_bytes": folder_bytes(dense_dir, weights),
        "compact_weights_with_masks_bytes": folder_bytes(compact_dir, weights),
        "dense_folder_bytes": folder_bytes(dense_dir),
        "compact_folder_bytes": folder_bytes(compact_dir),
        "encodings": encodings,
        "save_dense_s": save_dense_s,
        "save_compact_s": save_compact_s,
        "load_dense_s": load_dense_s,
        "load_compact_s": load_compact_s,
        "bit_exact": exact,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for label, pattern, sparsity, dtype in SETTINGS:
        with tempfile.TemporaryDirectory(prefix="ckpt-size-") as work:
            rows.append(run_setting(label, pattern, sparsity, dtype, args.model, Path(work)))
        print(json.dumps(rows[-1]), flush=True)
    mb = 1e6
    print()
    print(
        f"model: {args.model}; magnitude pruning of all Linear layers (per-layer); sizes in MB (10^6 bytes)"
    )
    print()
    print(
        "| setting | dense file | compact file | file ratio | pruned Linear dense | pruned Linear compact | pruned Linear ratio | save dense / compact (s) | load dense / compact (s) | bit-exact |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['setting']} | {r['dense_file_bytes'] / mb:.1f} | {r['compact_file_bytes'] / mb:.1f} | {r['file_ratio']:.3f}x "
            f"| {r['pruned_linear_dense_bytes'] / mb:.1f} | {r['pruned_linear_compact_bytes'] / mb:.1f} | {r['pruned_linear_ratio']:.3f}x "
            f"| {r['save_dense_s']:.2f} / {r['save_compact_s']:.2f} | {r['load_dense_s']:.2f} / {r['load_compact_s']:.2f} | {r['bit_exact']} |"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
