"""Dynamic activation sparsity (TEAL, CATS, MoEfication) on a pretrained decoder: WikiText-2 perplexity and batch-1
decoding.

Quality: the model (default ``smollm2``: SmolLM2-135M-Instruct) scored by WikiText-2 *test* perplexity over the
first ``--max-windows`` non-overlapping windows of ``--context`` tokens, dense first, then each ``--settings`` entry
(``teal:0.4``, ``teal:0.5:greedy``, ``cats:0.5``, ``wanda0.5+teal:0.4`` = 50% Wanda weights plus TEAL), thresholds
calibrated on ``--samples`` random windows of ``--seq-len`` tokens from WikiText-2 *valid*. Each row gives the
activation sparsity measured on the calibration data and the ratio to dense perplexity.

Encoder quality (``--stsb``): MiniLM's STS-B dev Spearman under the same settings, thresholds calibrated on SST-2
train sentences (encoders run many tokens at once, where zeroed inputs save no time with dense products).

Speed: batch-1 greedy decoding of ``--new-tokens`` tokens after a short prompt, tokens/s of the dense model and of
each ``--speed`` setting on the same model (thresholds calibrated as above; ``moefication:0.75`` keeps 4 of 16
experts), accelerated (`sparse_nlp.activation.accelerate`: the kernel that reads only the weight rows of kept
inputs, and for MoEfication only the kept experts' rows) and, for reference, with the hooks alone (the dense
product on the zeroed input). ``--ceiling`` adds the model with the blocks' Linear layers replaced by zero-cost
stand-ins: the speed-up that no sparsity of those layers can beat. Runs are interleaved, ``--repeats`` rounds;
each row gives the ratio of the medians and the median of the per-round ratios.

    python benchmarks/activation_sparsity.py --data-dir DATA --max-windows 8 --samples 16 --seq-len 512 \\
        --settings teal:0.25,teal:0.4,teal:0.5,cats:0.5 --speed teal:0.4,teal:0.5,cats:0.5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def parse_setting(text: str) -> tuple[float, str, float, str]:
    """``[wanda0.5+]method:sparsity[:allocation]`` -> (weight sparsity, method, sparsity, allocation)."""
    weights = 0.0
    if "+" in text:
        head, text = text.split("+", 1)
        if not head.startswith("wanda"):
            raise SystemExit(f"setting {head!r}: only 'wanda<sparsity>+' combines with activation sparsity")
        weights = float(head[len("wanda") :])
    parts = text.split(":")
    allocation = parts[2] if len(parts) > 2 else "uniform"
    return weights, parts[0], float(parts[1]), allocation


def calibration(args, tokenizer, samples: int | None = None) -> list:
    from sparse_nlp.pruning.calibration import CorpusWindows, calibration_batches

    data = CorpusWindows("wikitext2", cut="random", seed=0, data_dir=args.data_dir)
    return calibration_batches(data, tokenizer, num_samples=samples or args.samples, seq_len=args.seq_len)


def apply_setting(model, tokenizer, setting: str, args, cache: dict) -> dict:
    """Apply `setting` to `model`. Uniform TEAL and CATS thresholds come from histograms computed once per method
    (and weight pruning) and kept in `cache`; greedy TEAL and MoEfication run the whole `sparsify` call."""
    from sparse_nlp import ActivationSparsity, SparsityConfig, WeightSparsity, sparsify
    from sparse_nlp.activation import attach_thresholds, check_activation
    from sparse_nlp.activation.calibrate import histograms

    weights, method, sparsity, allocation = parse_setting(setting)
    batches = cache.get("batches") or cache.setdefault("batches", calibration(args, tokenizer))
    start = time.perf_counter()
    if weights:
        rule = WeightSparsity(method="wanda", sparsity=weights)
        sparsify(model, SparsityConfig(weights=[rule]), data=batches, progress=False)
    options = {"allocation": allocation} if method == "teal" else {}
    if allocation == "greedy":
        options.update(step=args.greedy_step, samples=args.greedy_samples)
    spec = ActivationSparsity(method=method, sparsity=sparsity, options=options)
    if method in ("teal", "cats") and allocation == "uniform":
        where, sites = check_activation(model, spec)[0].where, check_activation(model, spec)[1]
        key = (weights, method)
        if key not in cache:
            cache[key] = histograms(model, sites, where, batches)
        thresholds = {name: cache[key][name].threshold(sparsity) for name in sites}
        attach_thresholds(model, method, thresholds)
    else:
        sparsify(model, SparsityConfig(activation=spec), data=batches, progress=False)
    return {"calibrate_seconds": round(time.perf_counter() - start, 1)}


def count_zeros(model):
    """Hooks counting the zeros of every thresholded tensor (input sites: their input; others: their output)."""
    from sparse_nlp.activation import activation_state
    from sparse_nlp.activation.calibrate import SiteHooks
    from sparse_nlp.targets import resolve_module

    state = activation_state(model)
    record = (getattr(model.config, "sparse_nlp", None) or {}).get("activation") or {}
    if state.thresholds:  # full module names
        sites = {n: model.get_submodule(n) for n in state.thresholds}
    else:  # MoEfication: the activation modules, by base-model-relative name
        sites = {n: resolve_module(model, n) for n in record.get("expert_maps") or {}}
    counts = {n: [0, 0] for n in sites}

    def count(name, x):
        counts[name][0] += int((x == 0).sum())
        counts[name][1] += x.numel()

    hooks = SiteHooks(sites, "input" if state.where == "input" else "output", count)

    def finish() -> dict:
        hooks.remove()
        zeros = sum(c[0] for c in counts.values())
        total = max(1, sum(c[1] for c in counts.values()))
        sizes = {n: sites[n].weight.numel() if state.where == "input" else 1 for n in sites}
        weighted = sum(counts[n][0] / max(1, counts[n][1]) * sizes[n] for n in sites) / max(
            1, sum(sizes.values())
        )
        return {
            "measured_activation_sparsity": round(zeros / total, 4),
            "weight_weighted": round(weighted, 4),
        }

    return finish


def fresh_model(args):
    from sparse_nlp.models import load_model

    model, tokenizer = load_model(args.model, task="causal-lm")
    return model.eval(), tokenizer


def save(args, header: dict, quality_rows: list[dict], speed_rows: list[dict]) -> None:
    """Write everything measured so far (an interrupted run keeps its rows)."""
    Path(args.out).write_text(
        json.dumps({"run": header, "quality": quality_rows, "speed": speed_rows}, indent=2)
    )


def quality(args, header: dict) -> list[dict]:
    import sparse_nlp
    from sparse_nlp.evaluation.perplexity import evaluate_perplexity, perplexity_text

    model, tokenizer = fresh_model(args)
    text, _ = perplexity_text("wikitext2", split="test", data_dir=args.data_dir)
    ids = __import__("torch").tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    rows = []
    cache: dict = {}
    for setting in ["dense", *[s for s in args.settings.split(",") if s]]:
        row: dict = {"setting": setting}
        finish = None
        if setting != "dense":
            if "+" in setting:  # weight pruning changes the weights: start from a fresh copy
                model, tokenizer = fresh_model(args)
            row.update(apply_setting(model, tokenizer, setting, args, cache))
            finish = count_zeros(model)  # measured on the scored test windows
        start = time.perf_counter()
        result = evaluate_perplexity(
            model, tokenizer, ids, context=args.context, max_windows=args.max_windows, progress=False
        )
        if finish is not None:
            row.update(finish())
        row.update(
            perplexity=round(result["perplexity"], 3),
            eval_seconds=round(time.perf_counter() - start, 1),
            windows=result["windows"],
            scored_tokens=result["scored_tokens"],
            loadavg=[round(x, 2) for x in os.getloadavg()],
        )
        if setting != "dense":
            sparse_nlp.to_dense(model)
            if "+" in setting:
                model, tokenizer = fresh_model(args)
        rows.append(row)
        save(args, header, rows, [])
        print(json.dumps(row), flush=True)
    return rows


def stsb_rows(args) -> list[dict]:
    """The encoder (``--encoder``, default MiniLM) scored by STS-B dev Spearman x100 (mean pooling, cosine) under
    each ``--stsb`` setting, thresholds (and Wanda weights) calibrated on the first ``--encoder-samples`` SST-2
    train sentences (at most 128 tokens). A setting the model cannot take (CATS needs a gated FFN) is recorded with
    the error it raised."""
    from sparse_nlp import ActivationSparsity, SparsityConfig, WeightSparsity, sparsify
    from sparse_nlp.errors import ConfigError, UnsupportedModelError
    from sparse_nlp.evaluation.data import calibration_texts
    from sparse_nlp.evaluation.embeddings import stsb_scores
    from sparse_nlp.models import load_model

    texts = calibration_texts("sst2", data_dir=args.data_dir, limit=args.encoder_samples)
    rows = []
    for setting in ["dense", *[s for s in args.stsb.split(",") if s]]:
        model, tokenizer = load_model(args.encoder)
        model.eval()
        row: dict = {"setting": setting}
        finish = None
        if setting != "dense":
            weights, method, sparsity, allocation = parse_setting(setting)
            calib = dict(
                data=texts, tokenizer=tokenizer, num_samples=args.encoder_samples, seq_len=128, progress=False
            )
            options = {"allocation": allocation} if method == "teal" else {}
            start = time.perf_counter()
            try:
                if weights:
                    rule = WeightSparsity(method="wanda", sparsity=weights)
                    sparsify(model, SparsityConfig(weights=[rule]), **calib)
                spec = ActivationSparsity(method=method, sparsity=sparsity, options=options)
                sparsify(model, SparsityConfig(activation=spec), **calib)
            except (ConfigError, UnsupportedModelError) as exc:
                row["refused"] = str(exc)
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            row["calibrate_seconds"] = round(time.perf_counter() - start, 1)
            finish = count_zeros(model)  # measured on the scored STS-B sentences
        scores = stsb_scores(model, tokenizer, data_dir=args.data_dir)
        if finish is not None:
            row.update(finish())
        row.update(
            spearman=round(scores["spearman"], 2), pearson=round(scores["pearson"], 2), pairs=scores["pairs"]
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def stsb_table(rows: list[dict]) -> str:
    dense = next(r["spearman"] for r in rows if r["setting"] == "dense")
    lines = [
        "| setting | measured activation sparsity (values / weight-weighted) | STS-B Spearman | of dense |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['setting']} | refused: {r['refused']} | - | - |")
            continue
        s = r.get("measured_activation_sparsity")
        measured = "-" if s is None else f"{s:.1%} / {r['weight_weighted']:.1%}"
        lines.append(f"| {r['setting']} | {measured} | {r['spearman']:.2f} | {r['spearman'] / dense:.1%} |")
    return "\n".join(lines)


def decode_seconds(model, prompt, new_tokens: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one greedy generation of `new_tokens` tokens."""
    import torch

    with torch.no_grad():
        start, cpu = time.perf_counter(), time.process_time()
        out = model.generate(
            **prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert out.shape[1] == prompt["input_ids"].shape[1] + new_tokens
    return seconds, cpu


def kernel_rows(args) -> list[dict]:
    """The batch-1 kernel alone against torch's dense product, on the Linear shapes of the model, side by side."""
    import torch
    import torch.nn.functional as F

    from sparse_nlp.activation import kernel

    op = kernel.ops()
    if op is None:
        return []
    shapes = sorted(
        {
            (m.in_features, m.out_features)
            for m in fresh_model(args)[0].model.layers[0].modules()
            if isinstance(m, torch.nn.Linear)
        }
    )
    rows = []
    for inp, out in shapes:
        weight = torch.randn(out, inp)
        weight_t = weight.t().contiguous()
        x = torch.randn(1, inp)
        for sparsity in (0.0, 0.4, 0.5):
            t = float(x.abs().quantile(sparsity)) if sparsity else 0.0
            times = {"kernel": [], "dense": []}
            for _ in range(args.repeats):
                for name, fn in (
                    (
                        "kernel",
                        lambda x=x, w=weight_t, t=t: op.activation_linear(x, w, None, t, kernel.best_isa()),
                    ),
                    ("dense", lambda x=x, w=weight: F.linear(x, w)),
                ):
                    start = time.perf_counter()
                    for _ in range(200):
                        fn()
                    times[name].append((time.perf_counter() - start) / 200)
            k, d = statistics.median(times["kernel"]), statistics.median(times["dense"])
            rows.append(
                {
                    "shape": f"{inp}x{out}",
                    "sparsity": sparsity,
                    "kernel_us": round(k * 1e6, 1),
                    "dense_us": round(d * 1e6, 1),
                    "speedup": round(d / k, 2),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def zero_cost_blocks(model):
    """`model` with every Linear layer of its blocks (not the ``lm_head``) replaced by a stand-in that returns zeros
    of the right shape at almost no cost: the decoding speed no activation or weight sparsity of those layers can
    beat (everything else, the ``lm_head``, attention over the cache, norms and Python overhead, still runs)."""
    import torch
    from torch import nn

    class Zero(nn.Module):
        def __init__(self, out_features: int) -> None:
            super().__init__()
            self.out_features = out_features

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.new_zeros(*x.shape[:-1], self.out_features)

    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and module is not head:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Zero(module.out_features))
    return model


def speed(args) -> list[dict]:
    import copy

    import sparse_nlp
    from sparse_nlp.activation import ActivationLinear, accelerate, kernel

    base, tokenizer = fresh_model(args)
    prompt = tokenizer("The history of the city begins", return_tensors="pt")
    variants = {"dense": base}
    sparsity = {}
    # accelerated variant -> how many of its ActivationLinear layers hold compressed weights
    compressed: dict[str, str] = {}
    cache: dict = {}
    if args.ceiling:
        variants["ceiling"] = zero_cost_blocks(copy.deepcopy(base))
    for setting in [s for s in args.speed.split(",") if s]:
        for mode in ("hooks", "accelerated"):
            model = copy.deepcopy(base)
            apply_setting(model, tokenizer, setting, args, cache)
            if mode == "accelerated":
                accelerate(model)
                layers = [m for m in model.modules() if isinstance(m, ActivationLinear)]
                compressed[f"{setting} {mode}"] = f"{sum(m.compressed for m in layers)} of {len(layers)}"
            variants[f"{setting} {mode}"] = model
    for name, model in variants.items():
        finish = count_zeros(model) if name.endswith(" hooks") else None
        decode_seconds(
            model, prompt, 32
        )  # warm-up (and the kernel build); the sparsity of its decoding steps
        if finish is not None:
            sparsity[name.split(" ")[0]] = finish()["weight_weighted"]
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, model in variants.items():
            wall, used = decode_seconds(model, prompt, args.new_tokens)
            times[name].append(wall)
            cpu[name].append(used)
    dense, dense_cpu = statistics.median(times["dense"]), statistics.median(cpu["dense"])
    rows = []
    for name, values in times.items():
        median, median_cpu = statistics.median(values), statistics.median(cpu[name])
        rows.append(
            {
                "variant": name,
                "measured_activation_sparsity": sparsity.get(name.split(" ")[0]),
                "tokens_per_s": round(args.new_tokens / median, 2),
                "speedup": round(dense / median, 3),
                # the median of the per-round ratios: steadier when the machine drifts between rounds
                "paired_speedup": round(statistics.median(d / v for d, v in zip(times["dense"], values)), 3),
                "cpu_speedup": round(dense_cpu / median_cpu, 3),
                "seconds": [round(v, 3) for v in values],
                "cpu_seconds": [round(v, 3) for v in cpu[name]],
                "kernel": kernel.status(),
                "compressed_layers": compressed.get(name),
                "loadavg": [round(x, 2) for x in os.getloadavg()],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    for model in variants.values():
        sparse_nlp.to_dense(model)
    return rows


def table(quality_rows: list[dict], speed_rows: list[dict], kernel: list[dict]) -> str:
    lines = []
    dense = next((r["perplexity"] for r in quality_rows if r["setting"] == "dense"), None)
    if quality_rows:
        lines += [
            "| setting | measured activation sparsity (values / weight-weighted) | perplexity | x dense |",
            "| --- | ---: | ---: | ---: |",
        ]
        for r in quality_rows:
            s = r.get("measured_activation_sparsity")
            measured = "-" if s is None else f"{s:.1%} / {r['weight_weighted']:.1%}"
            lines.append(
                f"| {r['setting']} | {measured} | {r['perplexity']:.3f} | {r['perplexity'] / dense:.3f} |"
            )
    if speed_rows:
        lines += [
            "",
            "| decoding | measured activation sparsity | tokens/s | x dense | x dense, per round |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for r in speed_rows:
            s = r["measured_activation_sparsity"]
            lines.append(
                f"| {r['variant']} | {'-' if s is None else f'{s:.1%}'} | {r['tokens_per_s']:.2f} | {r['speedup']:.2f} "
                f"| {r['paired_speedup']:.2f} |"
            )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data-dir", default=os.environ.get("SPARSE_NLP_DATA_DIR"))
    p.add_argument(
        "--settings", default="teal:0.25,teal:0.4,teal:0.5,cats:0.5", help="quality rows ('' for none)"
    )
    p.add_argument("--speed", default="teal:0.4,teal:0.5,cats:0.5", help="decoding rows ('' for none)")
    p.add_argument("--samples", type=int, default=16, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--max-windows", type=int, default=8, help="perplexity over the first N test windows")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--ceiling",
        action="store_true",
        help="also decode with the blocks' Linear layers at zero cost: the speed-up no sparsity of them can beat",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--greedy-step", type=float, default=0.1, help="TEAL greedy allocation step")
    p.add_argument(
        "--greedy-samples", type=int, default=1, help="calibration samples the greedy search runs on"
    )
    p.add_argument(
        "--stsb",
        default="",
        help="encoder rows scored by STS-B, e.g. 'teal:0.4,teal:0.5,moefication:0.5' ('' for none)",
    )
    p.add_argument("--encoder", default="minilm", help="the encoder of the --stsb rows")
    p.add_argument("--encoder-samples", type=int, default=128, help="SST-2 calibration sentences (--stsb)")
    p.add_argument("--out", default="activation_sparsity.json")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    header = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cpu": cpu_model(),
        "threads": args.threads,
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(header), flush=True)
    encoder_rows = stsb_rows(args) if args.stsb else []
    quality_rows = quality(args, header) if args.settings else []
    speed_rows = speed(args) if args.speed else []
    kernel = kernel_rows(args) if args.speed else []
    header["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    save(args, header, quality_rows, speed_rows)
    data = json.loads(Path(args.out).read_text())
    data["kernel"] = kernel
    data["stsb"] = encoder_rows
    Path(args.out).write_text(json.dumps(data, indent=2))
    print(table(quality_rows, speed_rows, kernel))
    if encoder_rows:
        print(stsb_table(encoder_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
