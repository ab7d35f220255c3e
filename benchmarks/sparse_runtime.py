"""Sparse-weight Linear layers on the CPU against dense fp32 torch, measured side by side in one run.

Part ``layers``: y = x W^T + b for MiniLM (384x1536, 1536x384, 384x384) and SmolLM2-135M (576x1536, 1536x576)
shapes (out x in), sparsity 50-95%, 1 / 16 / 128 / 512 tokens, unstructured, 2:4 and block masks (``blockRxC``,
default 4x4); columns: dense F.linear ms, and the speed-up (dense time / time) of the native kernel
(`sparse_nlp.runtime`: compressed rows, or the block kernel for block masks), torch's CSR matmul and torch's BSR
(4x4 blocks) matmul, at 1 and 2 threads.

Part ``minilm``: the real all-MiniLM-L6-v2, every encoder Linear magnitude-pruned (90%, 80%, 2:4, or a block
pattern such as ``block4x4:90``), converted with
`sparse_nlp.runtime.convert` (autotuned) against the same masked model run dense, at batch 1 x 128 and 32 x 128;
with the largest relative difference of the outputs.

Part ``memory``: MiniLM magnitude-pruned to 90% (fp32), each measurement in a fresh process: (a) the bytes the
Linear layers hold dense (weight + bias) against the bytes of the converted layers (`runtime.convert` with the
native kernel only, so no dense copy is kept for a dense-timed bucket), with ``keep_masks=True`` and ``False``;
(b) the peak resident size (growth of VmHWM over the process after its imports) of loading the compact checkpoint
(`compact_checkpoint`, as ``sparse-nlp compact`` writes it) with ``from_pretrained(path, runtime="sparse")``,
against loading the dense checkpoint of the same model, and the compact one without the runtime. Each child runs
with the first of ``--threads`` (``OMP_NUM_THREADS``), so the autotune plans it reads are those of that thread count.

Part ``decode``: batch-1 greedy decoding and a prefill of a decoder pruned per model name (70, 50, 2:4), converted
against the same masked model run dense: SmolLM2-135M pruned by one-shot Wanda on WikiText-2 valid windows
(``--decoder smollm2``, needs ``--data-dir`` or ``$SPARSE_NLP_DATA_DIR``), or a random llama of its shape pruned by
magnitude (``--decoder random``); ``--ceiling`` adds the same model with its blocks' Linear layers replaced by
zero-cost stand-ins (the decoding speed-up that no sparsity of those layers can beat). Part ``sst2``: SST-2 dev predictions of a converted classifier against the masked
dense one (``--sst2-model``, default MiniLM 90% with a seeded untrained head).

Every call is timed with the candidates interleaved (one call of each per round) and the median is reported,
because the machine may be shared; the CPU model, ISA, threads, clock and load average are printed with every
table. ``--clock cpu`` times 1-thread calls by the thread's CPU time instead of elapsed time.

    HF_HUB_OFFLINE=1 python benchmarks/sparse_runtime.py --part layers --threads 1,2
    HF_HUB_OFFLINE=1 python benchmarks/sparse_runtime.py --part minilm --threads 1,2
    HF_HUB_OFFLINE=1 python benchmarks/sparse_runtime.py --part memory --threads 1
    HF_HUB_OFFLINE=1 python benchmarks/sparse_runtime.py --part decode --decoder smollm2 --models 70,50,2:4 --threads 1
    HF_HUB_OFFLINE=1 python benchmarks/sparse_runtime.py --part sst2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparse_nlp.runtime import CSRWeight, autotune, kernels, pack_weight

SHAPES = ((384, 1536), (1536, 384), (384, 384), (576, 1536), (1536, 576))


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def header(threads: int) -> str:
    isa = (
        kernels.isa_name(kernels.best_isa())
        if kernels.ops() is not None
        else "none (" + kernels.status() + ")"
    )
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return f"CPU: {autotune.cpu_model()} | kernel ISA: {isa} | torch ISA: {torch.backends.cpu.get_cpu_capability()} | threads: {threads} | clock: {_CLOCK['name']} | load average: {load}"


def mask_for(pattern: str, shape: tuple[int, int], sparsity: float, g: torch.Generator) -> torch.Tensor:
    out_f, in_f = shape
    if pattern == "unstructured":
        return torch.rand(shape, generator=g) >= sparsity
    if pattern == "2:4":  # keep 2 of every 4 consecutive inputs (50%)
        scores = torch.rand(out_f, in_f // 4, 4, generator=g)
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep.scatter_(2, scores.topk(2, dim=2).indices, True)
        return keep.reshape(out_f, in_f)
    if pattern.startswith("block"):  # e.g. block4x4, block8x1: whole R x C blocks
        r, c = (int(v) for v in pattern[len("block") :].split("x"))
        blocks = torch.rand(out_f // r, in_f // c, generator=g) >= sparsity
        return blocks.repeat_interleave(r, 0).repeat_interleave(c, 1)
    raise SystemExit(f"unknown pattern {pattern!r}")


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
"""``wall``: elapsed time (what a user waits). ``cpu``: CPU time of the calling thread, which leaves out the time the
thread waits while other processes run: on a shared machine it measures the work of a 1-thread call more stably
(valid at 1 thread only: torch's other threads are not counted)."""
_CLOCK = {"now": time.perf_counter, "name": "wall"}


def time_interleaved(
    runners: dict, rounds: int, warmup: int = 2, best: dict | None = None
) -> dict[str, float]:
    """Median seconds per call of each runner (interleaved rounds); `best`, when given, receives the minimum."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    now = _CLOCK["now"]
    for _ in range(warmup):
        for run in runners.values():
            run()
    for _ in range(rounds):
        for name, run in runners.items():
            start = now()
            run()
            times[name].append(now() - start)
    if best is not None:
        best.update({k: min(v) for k, v in times.items()})
    return {k: statistics.median(v) for k, v in times.items()}


def _layer_runners(x, weight, bias, packed, tcsr, bsr, op, isa) -> dict:
    xt = x.t().contiguous()  # (K, T): torch's BSR matmul takes the dense operand on the right
    runners = {
        "dense": lambda: F.linear(x, weight, bias),
        "csr": lambda: (tcsr @ x.t()).t() + bias,
        "bsr": lambda: (bsr @ xt).t() + bias,
    }
    if op is not None:
        runners["native"] = lambda: packed.run(x, bias, isa)
    return runners


def _model_runners(dense, fast, ids, mask) -> dict:
    return {
        "dense": lambda: dense(input_ids=ids, attention_mask=mask),
        "fast": lambda: fast(input_ids=ids, attention_mask=mask),
    }


def layer_grid(args) -> list[dict]:
    op = kernels.ops()
    isa = kernels.best_isa()
    rows = []
    for threads in _ints(args.threads):
        torch.set_num_threads(threads)
        print(f"\n## layers, {threads} thread(s)\n{header(threads)}\n")
        print(
            "| pattern | shape (out x in) | sparsity | tokens | dense ms | native x | torch CSR x | torch BSR x "
            "| native ms | native x (best of rounds) | native format |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for pattern in args.patterns.split(","):
            sparsities = [0.5] if pattern == "2:4" else _floats(args.sparsity)
            for shape in (
                SHAPES
                if args.shapes == "all"
                else [tuple(_ints(s.replace("x", ","))) for s in args.shapes.split(";")]
            ):
                for sparsity in sparsities:
                    g = torch.Generator().manual_seed(0)
                    mask = mask_for(pattern, shape, sparsity, g)
                    weight = torch.randn(shape, generator=g) * mask
                    bias = torch.randn(shape[0], generator=g)
                    csr = pack_weight(weight, mask)  # blocks where the mask is made of blocks
                    tcsr = CSRWeight.from_dense(weight, mask).to_torch_csr()
                    bsr = weight.to_sparse_bsr((4, 4))
                    for tokens in _ints(args.tokens):
                        x = torch.randn(tokens, shape[1], generator=g)
                        runners = _layer_runners(x, weight, bias, csr, tcsr, bsr, op, isa)
                        budget = tokens * shape[0] * shape[1]
                        rounds = args.rounds if budget < 50_000_000 else max(3, args.rounds // 2)
                        fastest: dict[str, float] = {}
                        with torch.inference_mode():
                            t = time_interleaved(runners, rounds, best=fastest)
                        row = {
                            "pattern": pattern,
                            "shape": f"{shape[0]}x{shape[1]}",
                            "sparsity": round(1 - csr.density, 3),
                            "tokens": tokens,
                            "threads": threads,
                            "dense_ms": t["dense"] * 1e3,
                            "native_x": t["dense"] / t["native"] if "native" in t else None,
                            "csr_x": t["dense"] / t["csr"],
                            "bsr_x": t["dense"] / t["bsr"],
                            "native_x_best": fastest["dense"] / fastest["native"] if "native" in t else None,
                            "format": csr.kind,
                        }
                        rows.append(row)
                        nat = f"{row['native_x']:.2f}" if row["native_x"] else "-"
                        nat_ms = f"{t['native'] * 1e3:.3f}" if "native" in t else "-"
                        nat_best = f"{row['native_x_best']:.2f}" if row["native_x_best"] else "-"
                        print(
                            f"| {pattern} | {row['shape']} | {row['sparsity']:.2f} | {tokens} | {row['dense_ms']:.3f} | "
                            f"{nat} | {row['csr_x']:.2f} | {row['bsr_x']:.2f} | {nat_ms} | {nat_best} | {csr.kind} |",
                            flush=True,
                        )
        print(f"\nload average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return rows


def minilm(args) -> list[dict]:
    import copy

    import transformers

    from sparse_nlp import sparsify
    from sparse_nlp.config import SparsityConfig
    from sparse_nlp.models import resolve_model
    from sparse_nlp.runtime import FusedActivation, convert, converted_layers, unfuse_activations

    base = transformers.AutoModel.from_pretrained(resolve_model("minilm"), dtype=torch.float32).eval()
    rows = []
    for name in args.models.split(","):
        if name == "2:4":
            config = SparsityConfig.magnitude(0.5, pattern="2:4", scope="per-layer")
        elif name.startswith("block"):  # e.g. block4x4:90
            shape, percent = name[len("block") :].split(":")
            config = SparsityConfig.magnitude(
                float(percent) / 100, pattern=f"block:{shape}", scope="per-layer"
            )
        else:
            config = SparsityConfig.magnitude(float(name) / 100, scope="per-layer")
        dense = copy.deepcopy(base)
        sparsify(dense, config, progress=False)
        for threads in _ints(args.threads):
            torch.set_num_threads(threads)
            fast = copy.deepcopy(dense)
            start = time.perf_counter()
            convert(fast, tokens=[b * args.seq for b in _ints(args.batch)])
            convert_s = time.perf_counter() - start
            unfused = copy.deepcopy(fast)  # the same packed layers, the GELU run by torch after the layer
            unfuse_activations(unfused)
            plans = [layer.plan for layer in converted_layers(fast).values()]
            fused = sum(1 for m in fast.modules() if isinstance(m, FusedActivation))
            print(
                f"\n## MiniLM {name}, {threads} thread(s): {len(plans)} of 36 Linear layers packed, {fused} GELUs fused "
                f"({convert_s:.1f} s to convert, autotune cache included)\n{header(threads)}\n"
            )
            print(
                "| model | batch x seq | dense ms | converted ms | speed-up | without fused GELU: ms | speed-up "
                "| max rel. diff |"
            )
            print("|---|---|---|---|---|---|---|---|")
            for batch in _ints(args.batch):
                g = torch.Generator().manual_seed(0)
                ids = torch.randint(1000, 20000, (batch, args.seq), generator=g)
                mask = torch.ones_like(ids)
                with torch.inference_mode():
                    ref = dense(input_ids=ids, attention_mask=mask).last_hidden_state
                    out = fast(input_ids=ids, attention_mask=mask).last_hidden_state
                    diff = float((out - ref).abs().max() / ref.abs().max())
                    runners = _model_runners(dense, fast, ids, mask)
                    runners["unfused"] = _model_runners(dense, unfused, ids, mask)["fast"]
                    t = time_interleaved(
                        runners,
                        rounds=args.rounds if batch == 1 else max(3, args.rounds // 3),
                        warmup=1,
                    )
                row = {
                    "model": name,
                    "batch": batch,
                    "seq": args.seq,
                    "threads": threads,
                    "dense_ms": t["dense"] * 1e3,
                    "converted_ms": t["fast"] * 1e3,
                    "speedup": t["dense"] / t["fast"],
                    "unfused_ms": t["unfused"] * 1e3,
                    "unfused_speedup": t["dense"] / t["unfused"],
                    "max_rel_diff": diff,
                    "methods": sorted({m for p in plans for m in p.values()}),
                }
                rows.append(row)
                print(
                    f"| {name} | {batch} x {args.seq} | {row['dense_ms']:.1f} | {row['converted_ms']:.1f} | "
                    f"{row['speedup']:.2f} | {row['unfused_ms']:.1f} | {row['unfused_speedup']:.2f} | {diff:.1e} |",
                    flush=True,
                )
            print(f"\nload average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
            if args.profile:
                profile_models(dense, fast, args.seq)
    return rows


def profile_models(dense, fast, seq: int, calls: int = 5) -> None:
    """Share of CPU time per op (torch.profiler) of the dense and the converted model at batch 1 x `seq`."""
    ids = torch.randint(1000, 20000, (1, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for label, model in (("dense", dense), ("converted", fast)):
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)
            with torch.profiler.profile() as prof:
                for _ in range(calls):
                    model(input_ids=ids, attention_mask=mask)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        shares = ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in events[:6])
        print(
            f"profile, {label}, batch 1 x {seq} ({total / calls / 1e3:.1f} ms per call under the profiler): {shares}"
        )


def sst2(args) -> list[dict]:
    """SST-2 dev through a sequence classifier, masked dense against converted: accuracy of both, how many
    predictions differ, the largest relative logit difference. Default model: MiniLM magnitude-pruned to 90% with a
    seeded, untrained 2-label head (its accuracy is near chance; the check is that the two agree)."""
    import copy

    import transformers

    from sparse_nlp import sparsify
    from sparse_nlp.config import SparsityConfig
    from sparse_nlp.evaluation.tasks import compute_task_metrics, encode_glue, predict
    from sparse_nlp.models import resolve_model
    from sparse_nlp.runtime import convert, converted_layers

    threads = _ints(args.threads)[0]
    torch.set_num_threads(threads)
    if args.sst2_model:  # a checkpoint of this package (masks restored) or any transformers classifier
        from sparse_nlp import from_pretrained

        source, untrained = args.sst2_model, False
        dense = from_pretrained(source, transformers.AutoModelForSequenceClassification, dtype=torch.float32)
    else:
        source, untrained = resolve_model("minilm"), True
        torch.manual_seed(0)
        dense = transformers.AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=2, dtype=torch.float32
        )
        sparsify(dense, SparsityConfig.magnitude(0.9, scope="per-layer"), progress=False)
    dense.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    features = encode_glue(tokenizer, "sst2", "dev", data_dir=args.data_dir)
    labels = [f["labels"] for f in features]
    fast = convert(copy.deepcopy(dense), tokens=[32 * 64, 64 * 64])
    start = time.perf_counter()
    ref = predict(dense, features, tokenizer, batch_size=32, progress=False)  # (N, 2)
    dense_s = time.perf_counter() - start
    start = time.perf_counter()
    out = predict(fast, features, tokenizer, batch_size=32, progress=False)
    fast_s = time.perf_counter() - start
    differ = int((ref.argmax(-1) != out.argmax(-1)).sum())
    rel = float((out - ref).abs().max() / ref.abs().max())
    acc = [compute_task_metrics("sst2", x.argmax(-1).tolist(), labels)["accuracy"] for x in (ref, out)]
    head = "seeded untrained head" if untrained else "trained head"
    print(
        f"\n## SST-2 dev, {len(labels)} sentences, {source if not untrained else 'MiniLM 90% magnitude'} ({head}), "
        f"{len(converted_layers(fast))} layers packed\n{header(threads)}\n"
    )
    print(
        "| accuracy masked dense | accuracy converted | predictions that differ | max rel. logit diff | speed-up |"
    )
    print("|---|---|---|---|---|")
    print(f"| {acc[0]:.2f} | {acc[1]:.2f} | {differ} | {rel:.1e} | {dense_s / fast_s:.2f} |")
    return [{"accuracy": acc, "differ": differ, "max_rel_diff": rel, "untrained_head": untrained}]


def _decoder(args):
    """The decoder to prune for the decode part: SmolLM2-135M (`smollm2` alias, Wanda on WikiText-2 valid windows)
    or a random llama of its shape (magnitude), and a function that prunes a copy of it for a model name."""
    import transformers

    from sparse_nlp import sparsify
    from sparse_nlp.config import SparsityConfig, WeightSparsity

    def rule(name: str, method: str) -> WeightSparsity:
        if name == "2:4":
            return WeightSparsity(method=method, sparsity=0.5, pattern="2:4", scope="per-layer")
        return WeightSparsity(method=method, sparsity=float(name) / 100, scope="per-layer")

    if args.decoder == "smollm2":
        from sparse_nlp.models import load_model
        from sparse_nlp.pruning.calibration import CorpusWindows

        base, tokenizer = load_model("smollm2", task="causal-lm")
        base = base.float().eval()
        data = CorpusWindows("wikitext2", cut="random", seed=0, data_dir=args.data_dir)

        def prune(model, name):
            sparsify(
                model,
                SparsityConfig(weights=[rule(name, "wanda")]),
                data=data,
                tokenizer=tokenizer,
                num_samples=args.calib_samples,
                seq_len=args.calib_seq,
                progress=False,
            )

        return "SmolLM2-135M-Instruct, one-shot Wanda", base, prune
    config = transformers.LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config).eval()

    def prune(model, name):
        sparsify(model, SparsityConfig(weights=[rule(name, "magnitude")]), progress=False)

    return "random llama (SmolLM2-135M shape), magnitude", base, prune


def decode(args) -> list[dict]:
    """A decoder pruned per model name: batch-1 greedy decoding and a prefill, converted against masked dense."""
    import copy

    from activation_sparsity import zero_cost_blocks  # the sibling benchmark script

    from sparse_nlp.runtime import convert, converted_layers

    title, base, prune = _decoder(args)
    rows = []
    threads = _ints(args.threads)[0]
    torch.set_num_threads(threads)
    for name in args.models.split(","):
        dense = copy.deepcopy(base)
        prune(dense, name)
        fast = copy.deepcopy(dense)
        convert(fast, tokens=[1, args.prefill])
        packed = len(converted_layers(fast))
        print(f"\n## {title} {name}, {threads} thread(s): {packed} of 210 Linear layers packed")
        print(header(threads) + "\n")
        print("| model | what | dense | converted | speed-up | same tokens |")
        print("|---|---|---|---|---|---|")
        prompt = torch.randint(0, 49152, (1, 8), generator=torch.Generator().manual_seed(1))
        gen = dict(max_new_tokens=args.new_tokens, do_sample=False, min_new_tokens=args.new_tokens)
        with torch.inference_mode():
            same = bool(torch.equal(dense.generate(prompt, **gen), fast.generate(prompt, **gen)))
            t = time_interleaved(_generate_runners(dense, fast, prompt, gen), rounds=3, warmup=0)
            long = torch.randint(0, 49152, (1, args.prefill), generator=torch.Generator().manual_seed(2))
            p = time_interleaved(_model_runners_ids(dense, fast, long), rounds=3, warmup=1)
        dense_tps, fast_tps = args.new_tokens / t["dense"], args.new_tokens / t["fast"]
        print(
            f"| {name} | decode, tokens/s ({args.new_tokens} new) | {dense_tps:.1f} | {fast_tps:.1f} | {fast_tps / dense_tps:.2f} | {same} |"
        )
        print(
            f"| {name} | prefill {args.prefill} tokens, ms | {p['dense'] * 1e3:.0f} | {p['fast'] * 1e3:.0f} | {p['dense'] / p['fast']:.2f} | |"
        )
        if args.ceiling:
            ceiling = zero_cost_blocks(copy.deepcopy(dense))
            with torch.inference_mode():
                c = time_interleaved(_generate_runners(dense, ceiling, prompt, gen), rounds=3, warmup=0)
            print(
                f"| {name} | ceiling: block Linear layers at zero cost, tokens/s | {args.new_tokens / c['dense']:.1f} "
                f"| {args.new_tokens / c['fast']:.1f} | {c['dense'] / c['fast']:.2f} | |"
            )
            del ceiling
        print(f"\nload average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
        rows.append(
            {
                "model": name,
                "threads": threads,
                "decode_tokens_per_s": [dense_tps, fast_tps],
                "prefill_s": [p["dense"], p["fast"]],
                "same_tokens": same,
            }
        )
    return rows


def _generate_runners(dense, fast, prompt, gen: dict) -> dict:
    return {"dense": lambda: dense.generate(prompt, **gen), "fast": lambda: fast.generate(prompt, **gen)}


def _model_runners_ids(dense, fast, ids) -> dict:
    return {"dense": lambda: dense(input_ids=ids), "fast": lambda: fast(input_ids=ids)}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (the memory part needs Linux)")


def _tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct tensor storages a module holds (parameters, buffers, a torch CSR copy)."""
    tensors = [*module.parameters(), *module.buffers()]
    tcsr = getattr(module, "_torch_csr", None)
    if tcsr is not None:
        tensors += [tcsr.crow_indices(), tcsr.col_indices(), tcsr.values()]
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def memory_child(kind: str, folder: str, keep_masks: str) -> None:
    """Runs in a fresh process; prints one JSON line. kind: 'layers' (a), or 'load-dense', 'load-compact',
    'load-compact-sparse' (b)."""
    import gc

    import sparse_nlp
    from sparse_nlp.runtime import convert, converted_layers

    kernels.ops()  # the library load (or build) is not part of what is measured
    # nor are the imports that loading does on first use (the model class, the checkpoint code): only the weights
    import transformers

    import sparse_nlp.checkpoint  # noqa: F401

    config = json.loads((Path(folder) / "config.json").read_text())
    for name in config.get("architectures") or ["AutoModel"]:
        getattr(transformers, name)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current size
    before = _status_kib("VmRSS")
    row: dict = {"kind": kind}
    if kind == "layers":
        model = sparse_nlp.from_pretrained(folder)
        linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        row["dense_bytes"] = sum(
            m.weight.numel() * 4 + (m.bias.numel() * 4 if m.bias is not None else 0) for m in linears.values()
        )
        row["masked_dense_bytes"] = sum(_tensor_bytes(m) for m in linears.values())  # weight, bias, mask
        convert(model, methods=("native",), keep_masks=keep_masks == "1", use_cache=False)
        layers = converted_layers(model)
        row["layers"] = f"{len(layers)} of {len(linears)}"
        packed = sum(_tensor_bytes(m) for m in layers.values())
        rest = sum(_tensor_bytes(m) for n, m in linears.items() if n not in layers)  # left dense
        row["converted_bytes"] = packed + rest
        row["keep_masks"] = keep_masks == "1"
    else:
        runtime = "sparse" if kind == "load-compact-sparse" else None
        model = sparse_nlp.from_pretrained(folder, runtime=runtime)
        with (
            torch.no_grad()
        ):  # read every tensor once, as a forward pass would: file-mapped pages become resident
            for t in [*model.parameters(), *model.buffers()]:
                t.float().sum()
        row["model_bytes"] = _tensor_bytes(model)
        row["parameter_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        if runtime:
            row["converted_layers"] = len(converted_layers(model))
    gc.collect()
    row["peak_growth_kib"] = _status_kib("VmHWM") - before
    row["final_growth_kib"] = _status_kib("VmRSS") - before
    print(json.dumps(row), flush=True)


def memory(args) -> list[dict]:
    import subprocess
    import tempfile

    import transformers

    from sparse_nlp import compact_checkpoint, save_pretrained, sparsify
    from sparse_nlp.config import SparsityConfig
    from sparse_nlp.models import resolve_model

    def child(*argv: str) -> dict:
        cmd = [sys.executable, __file__, "--memory-child", *argv]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # the autotune plans are per thread count
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    threads = _ints(args.threads)[0]
    torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = transformers.AutoModel.from_pretrained(resolve_model("minilm"), dtype=torch.float32).eval()
        sparsify(model, SparsityConfig.magnitude(0.9, scope="per-layer"), progress=False)
        dense_dir, compact_dir = Path(tmp) / "m90", Path(tmp) / "m90-compact"
        save_pretrained(model, dense_dir)
        compact_checkpoint(dense_dir, compact_dir)
        del model
        print(f"\n## Memory: MiniLM magnitude 90% (per layer), fp32\n{header(torch.get_num_threads())}\n")
        print("(a) Linear layers, tensor bytes (a fresh process each)\n")
        print(
            "| keep_masks | layers packed | dense weight + bias | masked dense (with masks) | converted | converted / dense |"
        )
        print("|---|---|---|---|---|---|")
        for keep in ("1", "0"):
            row = child("layers", str(dense_dir), keep)
            row["ratio"] = row["converted_bytes"] / row["dense_bytes"]
            rows.append(row)
            mib = 1 << 20
            print(
                f"| {row['keep_masks']} | {row['layers']} | {row['dense_bytes'] / mib:.1f} MiB | "
                f"{row['masked_dense_bytes'] / mib:.1f} MiB | {row['converted_bytes'] / mib:.1f} MiB | "
                f"{row['ratio']:.3f} |",
                flush=True,
            )
        sizes = {p.name: p.stat().st_size for p in compact_dir.iterdir() if p.suffix == ".safetensors"}
        print(
            f"\n(b) loading, peak resident growth over the process after imports (compact files: {sizes})\n"
        )
        print(
            "| load | peak growth | resident after | tensor bytes of the model | peak / dense load | peak / one dense copy |"
        )
        print("|---|---|---|---|---|---|")
        loads = [
            ("dense checkpoint, from_pretrained(path)", "load-dense", dense_dir),
            ("compact checkpoint, from_pretrained(path)", "load-compact", compact_dir),
            (
                'compact checkpoint, from_pretrained(path, runtime="sparse")',
                "load-compact-sparse",
                compact_dir,
            ),
        ]
        dense_peak = dense_copy = None
        for label, kind, folder in loads:
            row = child(kind, str(folder), "1")
            row["label"] = label
            dense_peak = dense_peak or row["peak_growth_kib"]
            dense_copy = dense_copy or row["parameter_bytes"]  # fp32 parameters of the dense model
            row["peak_vs_dense_load"] = row["peak_growth_kib"] / dense_peak
            row["peak_vs_dense_copy"] = row["peak_growth_kib"] * 1024 / dense_copy
            rows.append(row)
            print(
                f"| {label} | {row['peak_growth_kib'] / 1024:.1f} MiB | {row['final_growth_kib'] / 1024:.1f} MiB | "
                f"{row['model_bytes'] / (1 << 20):.1f} MiB | {row['peak_vs_dense_load']:.2f} | "
                f"{row['peak_vs_dense_copy']:.2f} |",
                flush=True,
            )
        print(f"\none dense copy (fp32 parameters of the dense model): {dense_copy / (1 << 20):.1f} MiB")
    print(f"\nload average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--memory-child"]:
        memory_child(*argv[1:4])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("layers", "minilm", "decode", "memory", "sst2", "all"), default="all")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--patterns", default="unstructured,2:4,block4x4")
    p.add_argument("--shapes", default="all", help="'all' or e.g. '384x1536;384x384'")
    p.add_argument("--sparsity", default="0.5,0.7,0.8,0.9,0.95")
    p.add_argument("--tokens", default="1,16,128,512")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds per cell (interleaved)")
    p.add_argument(
        "--models",
        default="90,80,2:4",
        help="MiniLM sparsities in percent, 2:4, and/or block patterns such as block4x4:90",
    )
    p.add_argument("--batch", default="1,32")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument(
        "--decoder",
        choices=("random", "smollm2"),
        default="random",
        help="decode: a random llama of SmolLM2-135M's shape (magnitude), or SmolLM2-135M (Wanda)",
    )
    p.add_argument(
        "--data-dir", default=os.environ.get("SPARSE_NLP_DATA_DIR"), help="decode: WikiText-2 folder"
    )
    p.add_argument("--calib-samples", type=int, default=16, help="decode: Wanda calibration windows")
    p.add_argument("--calib-seq", type=int, default=512, help="decode: tokens per calibration window")
    p.add_argument(
        "--sst2-model", help="sst2: a fine-tuned sequence classifier (default: MiniLM 90%%, untrained head)"
    )
    p.add_argument("--new-tokens", type=int, default=32, help="decode: greedy tokens generated per call")
    p.add_argument("--prefill", type=int, default=512, help="decode: prompt length of the prefill timing")
    p.add_argument("--profile", action="store_true", help="also print each MiniLM model's op time shares")
    p.add_argument(
        "--ceiling",
        action="store_true",
        help="decode: also time the model with its blocks' Linear layers at zero cost (what no sparsity can beat)",
    )
    p.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: the thread's CPU time (1 thread only; steadier on a shared machine)",
    )
    p.add_argument("--json", dest="json_path")
    args = p.parse_args(argv)
    if args.clock == "cpu" and _ints(args.threads) != [1]:
        p.error("--clock cpu measures one thread's CPU time: use it with --threads 1")
    _CLOCK.update(now=CLOCKS[args.clock], name=args.clock)
    start = time.perf_counter()
    kernels.ops()
    print(f"native kernel: {kernels.status()} (first use in this process: {kernels.load_seconds():.1f} s)")
    results: dict = {"cpu": autotune.cpu_model(), "argv": sys.argv[1:], "loadavg_before": os.getloadavg()}
    if args.part in ("layers", "all"):
        results["layers"] = layer_grid(args)
    if args.part in ("minilm", "all"):
        results["minilm"] = minilm(args)
    if args.part == "decode":
        results["decode"] = decode(args)
    if args.part == "memory":
        results["memory"] = memory(args)
    if args.part == "sst2":
        results["sst2"] = sst2(args)
    results["loadavg_after"] = os.getloadavg()
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
