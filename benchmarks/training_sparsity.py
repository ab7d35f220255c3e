"""Training-aware sparsity on MiniLM: table and plot of task quality against sparsity, from recipe runs.

The runs themselves are recipes (``recipes/*.yaml``, ``benchmarks/experiments/*.yaml``) executed with ``sparse-nlp run``; this script
reads their ``results.json`` files (several folders of one recipe are merged in order, e.g. a run that was
continued with ``--start-from``), prints one table with the dense result and each sparse result side by
side (ratio to dense), and writes ``training_sparsity.json`` and ``training_sparsity.png`` into --out (``--name`` changes the file names).

    sparse-nlp run benchmarks/experiments/minilm-sst2-gmp.yaml --data-dir ../shared/data --out runs/minilm-sst2-gmp
    sparse-nlp run recipes/minilm-stsb-gmp80.yaml --data-dir ../shared/data --out runs/minilm-stsb-gmp80
    python benchmarks/training_sparsity.py --run sst2=runs/minilm-sst2-gmp --run stsb=runs/minilm-stsb-gmp80 \
        --out benchmarks/results
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path


def merged_stages(folders: list[Path]) -> dict[str, dict]:
    """Stage records by name over the results.json of `folders` (later folders win, skipped stages don't).

    Each record gets ``started_from``: the model its run started from (the recipe's model, or --start-from).
    """
    stages: dict[str, dict] = {}
    for folder in folders:
        path = folder / "results.json"
        if not path.is_file():
            continue
        results = json.loads(path.read_text())
        for record in results["stages"]:
            if "skipped" in record and record["name"] in stages:
                continue
            # runs written before results.json named a device always trained on the CPU
            stages[record["name"]] = {
                **record,
                "started_from": results.get("model"),
                "device": results.get("device", "cpu"),
                "run_folder": str(folder),
            }
    return stages


def recipe_stage(record: dict):
    """The recipe `Stage` of a training stage (defaults filled in), read from the recipe saved next to its
    checkpoint, else from the copy at the top of the run folder (a run made on another machine whose checkpoints
    stayed there); None for a stage without a checkpoint."""
    if "checkpoint" not in record:
        return None
    from sparse_nlp.recipes import load_recipe

    path = Path(record["checkpoint"]) / "recipe.yaml"
    if not path.is_file():
        path = Path(record["run_folder"]) / "recipe.yaml"
    return next(s for s in load_recipe(path).stages if s.name == record["name"])


def stage_method(record: dict, stage) -> str:
    """'dense', or the pruning method(s) of a prune stage (`stage`: its recipe `Stage`)."""
    if record.get("type") != "prune":
        return "dense"
    methods = sorted({rule.method for rule in stage.sparsity.weights})
    if stage.distillation is None:
        return "+".join(methods)
    return "+".join(methods) + (
        " + hidden distillation" if stage.distillation.hidden_weight else " + distillation"
    )


def rows_for(task: str, folders: list[Path]) -> list[dict]:
    """One row per evaluate stage: the training stage before it, its sparsity, metric, and wall times."""
    from sparse_nlp.recipes import TrainingSettings

    stages = merged_stages(folders)
    rows = []
    for name, record in stages.items():
        if record["type"] != "evaluate":
            continue
        trained = stages.get(name.removeprefix("eval-"), {})
        metric = record["main_metric"]
        stage = recipe_stage(trained)
        rows.append(
            {
                "task": task,
                "stage": trained.get("name", name),
                "method": stage_method(trained, stage),
                "run": Path(trained["checkpoint"]).parent.name if "checkpoint" in trained else None,
                "device": trained.get("device", record.get("device")),
                "target_sparsity": trained.get("target_sparsity"),
                "block_sparsity": record["block_sparsity"],
                "metric": metric,
                "value": record[metric],
                "started_from": trained.get("started_from"),
                "train_steps": trained.get("steps"),
                "batch_size": stage.training.batch_size if stage else TrainingSettings.batch_size,
                "train_seconds": trained.get("wall_seconds"),
                "eval_seconds": record["wall_seconds"],
            }
        )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the plot needs matplotlib: pip install sparse-nlp[bench]") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        dense_row = next(r for r in rows if r["task"] == task and r["method"] == "dense")
        dense = dense_row["value"]
        groups = sorted({r["group"] for r in rows if r["task"] == task and r["method"] != "dense"})
        markers = itertools.cycle("os^vDPX*<>ph")
        for group, marker in zip(groups, markers):  # one line per --run argument
            pruned = [r for r in rows if r["task"] == task and r["group"] == group and r["method"] != "dense"]
            series = [dense_row, *sorted(pruned, key=lambda r: r["block_sparsity"])]
            xs, ys = [100 * r["block_sparsity"] for r in series], [r["value"] for r in series]
            runs = ", ".join(r["run"] for r in pruned)
            where = ", on a GPU" if str(pruned[0].get("device", "cpu")).startswith("cuda") else ""
            ax.plot(xs, ys, marker + "-", label=f"{pruned[0]['method']} ({runs}{where})")
            for r, x, y in zip(series, xs, ys):
                ax.annotate(
                    f"{r['train_steps']} steps x {r['batch_size']}",
                    (x, y),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                )
        ax.axhline(dense * 0.99, color="gray", ls="--", lw=0.8, label="99% of dense")
        ax.axhline(dense * 0.98, color="gray", ls=":", lw=0.8, label="98% of dense")
        metric = next(r["metric"] for r in rows if r["task"] == task)
        ax.set_xlabel("sparsity of encoder Linear weights (%)")
        ax.set_ylabel(f"{task} dev {metric}")
        ax.set_title(f"{task.upper()}: quality vs sparsity")
        ax.grid(alpha=0.3)
        # the legend goes below the axes, so it hides none of the points
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--run",
        action="append",
        required=True,
        help="TASK=FOLDER[,FOLDER...] (results.json of sparse-nlp run)",
    )
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="training_sparsity", help="file name of the .json and .png under --out")
    args = p.parse_args()
    rows = []
    for group, item in enumerate(args.run):
        task, folders = item.split("=", 1)
        rows += [{**r, "group": group} for r in rows_for(task, [Path(f) for f in folders.split(",")])]
    for r in rows:  # runs continued with --start-from share the dense row of their task
        dense = next((d["value"] for d in rows if d["task"] == r["task"] and d["method"] == "dense"), None)
        r["ratio_to_dense"] = round(r["value"] / dense, 4) if dense else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, out / f"{args.name}.png")
    header = f"{'task':<5} {'run':<22} {'stage':<10} {'method':<26} {'sparsity':>8} {'metric':<9} {'value':>6} {'vs dense':>8} {'steps':>5} {'batch':>5} {'train s':>8} device"
    print(header)
    for r in rows:
        print(
            f"{r['task']:<5} {r['run'] or '':<22} {r['stage']:<10} {r['method']:<26} {100 * r['block_sparsity']:>7.1f}% {r['metric']:<9} {r['value']:>6.2f} "
            f"{100 * r['ratio_to_dense']:>7.1f}% {r['train_steps'] or '':>5} {r['batch_size']:>5} {r['train_seconds'] or '':>8} {r['device']}"
        )


if __name__ == "__main__":
    main()
