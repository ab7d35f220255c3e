"""Push sparse checkpoints to the Hugging Face Hub with a generated model card; pull them back exactly.

``push_to_hub(model_or_dir, "org/name")`` uploads the checkpoint folder (weights - dense or compact -,
masks, tokenizer, our metadata in config.json, the recipe ``sparsity_config.json``) in one commit, plus a
``README.md`` model card rendered with huggingface_hub's `ModelCard` from the package's
``templates/model_card.md``. The card states what was *measured* on the weights (`sparse_nlp.report`),
not what was asked for: sparsity per module group, the speed ratio from a benchmark result JSON when there is one, and model-index
evaluation results from an evaluation JSON.

Pulling is `sparse_nlp.from_pretrained("org/name")`: it downloads the repository into the Hugging Face
cache and rebuilds the same model (masks, attention pattern, structured shapes), also offline from the
cache later.

The local folder is never written to: the card is rendered in memory and uploaded beside the files. A
commit is atomic on the Hub, so a failed push leaves the repository as it was.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import CONFIG_FILE, from_pretrained, save_pretrained, verify_checkpoint
from .errors import HubError
from .evaluation.glue import GLUE, HUB_DATASET
from .formats.manifest import CHECKPOINT_PATTERNS
from .metadata import METADATA_KEY, read_metadata
from .report import report

logger = logging.getLogger(__name__)

TEMPLATE = Path(__file__).resolve().parent / "templates" / "model_card.md"
EVALUATION_FILES = ("evaluation.json", "eval_results.json", "results.json")
BENCHMARK_FILES = ("benchmark.json", "speed.json")
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
"""Files that can run code when loaded (Python pickles): never uploaded, even when included."""

# task name -> (Hub data set id, config, task type for model-index, title)
TASKS = {
    **{name: (HUB_DATASET, name, t.task_type, t.title) for name, t in GLUE.items()},
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "text-generation", "WikiText-2"),
    "tinyshakespeare": ("karpathy/tiny_shakespeare", None, "text-generation", "Tiny Shakespeare"),
}
_NOT_METRICS = (
    "runtime",
    "samples_per_second",
    "steps_per_second",
    "loss",
    "epoch",
    "seconds",
    "seed",
    "num_samples",
)
# top-level keys read as metrics (what `sparse-nlp evaluate` writes: {"task", "split", "accuracy", ...}):
# every metric key of the GLUE table (MNLI's accuracy_mismatched included), and a few more
METRIC_NAMES = (
    *dict.fromkeys(k for t in GLUE.values() for k in t.metric_keys),
    "accuracy",
    "f1",
    "matthews",
    "mcc",
    "pearson",
    "spearman",
    "combined_score",
    "perplexity",
    "exact_match",
)
_SPLITS = {"dev": "validation", "valid": "validation"}


@dataclass
class PushResult:
    repo_id: str
    commit_url: str
    commit_oid: str
    files: list[str]


def push_files(
    folder: str | os.PathLike,
    *,
    include: list[str] | tuple[str, ...] = (),
    exclude: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """The files of a checkpoint folder that a push uploads (README.md, the card, comes on top).

    By default exactly the checkpoint: ``config.json`` and the files its ``sparse_nlp.files`` manifest lists
    (weights, masks, tokenizer, recipe), or for a plain checkpoint without a manifest the files transformers
    writes (`CHECKPOINT_PATTERNS`). Nothing else under the folder goes (no Trainer checkpoints, evaluation
    JSONs or logs). `include` adds files matching glob patterns (relative paths, ``**`` not needed:
    ``trainer/*`` matches one level); `exclude` removes added ones.

    Raises:
        HubError: an included file is a pickle (`PICKLE_SUFFIXES`; never uploaded), a pattern matches nothing,
            or `exclude` would remove a file of the checkpoint itself.
    """
    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    meta = raw.get(METADATA_KEY) if isinstance(raw, dict) else None
    manifest = meta.get("files") if isinstance(meta, dict) else None
    on_disk = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if isinstance(manifest, dict):
        core = {"config.json", *manifest}
    else:
        core = {f for f in on_disk if any(fnmatch.fnmatchcase(f, pat) for pat in CHECKPOINT_PATTERNS)}
    for pattern in exclude:
        hit = sorted(f for f in core if fnmatch.fnmatchcase(f, pattern))
        if hit:
            raise HubError(
                f"--exclude {pattern!r} would remove {hit[0]!r}, a file of the checkpoint itself; "
                "a pushed checkpoint must be complete."
            )
    extra = set()
    for pattern in include:
        hit = {f for f in on_disk if fnmatch.fnmatchcase(f, pattern)}
        if not hit:
            raise HubError(f"--include {pattern!r} matches no file under {str(folder)!r}.")
        extra |= hit
    extra = {f for f in extra if not any(fnmatch.fnmatchcase(f, pat) for pat in exclude)}
    files = sorted(core | extra)
    pickles = [f for f in files if f.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise HubError(
            f"{str(folder / pickles[0])!r} is a pickle ({', '.join(pickles[:5])}); pickles can run code when "
            "loaded and are never pushed. Save the weights as safetensors (sparse_nlp.save_pretrained)."
        )
    return [f for f in files if f != "README.md"]


# ---- evaluation and benchmark JSON -----------------------------------------------------------------------


def _load_json(source: str | os.PathLike | dict | list | None, what: str) -> Any:
    if source is None or isinstance(source, (dict, list)):
        return source
    path = Path(source)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist.") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the {what} file is not valid JSON ({err}).") from None


def eval_results(evaluation: Any) -> list:
    """`EvalResult`s from an evaluation JSON: a dict (or list of dicts) with ``task`` and metrics.

    Metrics are read from a ``metrics`` dict, from top-level numbers named ``eval_<metric>`` (what the
    Trainer writes; e.g. ``benchmarks/finetune_dense.py``'s results.json), and from top-level numbers with a
    metric name (`METRIC_NAMES`; what ``sparse-nlp evaluate`` writes). Optional keys: ``split`` (default
    ``validation``; ``dev`` means ``validation``), ``dataset`` / ``dataset_config`` for other tasks.
    """
    from huggingface_hub import EvalResult

    if evaluation is None:
        return []
    items = evaluation.get("results", evaluation) if isinstance(evaluation, dict) else evaluation
    items = items if isinstance(items, list) else [items]
    out = []
    for item in items:
        if not isinstance(item, dict) or "task" not in item:
            raise ValueError(f"an evaluation result needs a 'task' key, got {str(item)[:120]!r}.")
        if item.get("untrained_head"):
            logger.warning(
                "not publishing the %s result: it was measured with an untrained head", item["task"]
            )
            continue
        task = str(item["task"]).lower().replace("-", "").replace("_", "")
        dataset, config, task_type, pretty = TASKS.get(
            task, (item.get("dataset", task), None, "text-classification", task)
        )
        config = item.get("dataset_config", config)
        metrics = dict(item.get("metrics") or {})
        for key, value in item.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if key.startswith("eval_"):
                metrics.setdefault(key.removeprefix("eval_"), value)
            elif key in METRIC_NAMES:
                metrics.setdefault(key, value)
        metrics = {k: v for k, v in metrics.items() if not any(bad in k for bad in _NOT_METRICS)}
        split = _SPLITS.get(str(item.get("split")), str(item.get("split", "validation")))
        for name, value in metrics.items():
            name, metric_split = _glue_split(task, name, split)
            out.append(
                EvalResult(
                    task_type=item.get("task_type", task_type),
                    dataset_type=dataset,
                    dataset_name=item.get("dataset_name", pretty),
                    dataset_config=config,
                    dataset_split=metric_split,
                    metric_type=name,
                    metric_name=name,
                    metric_value=round(float(value), 4),
                )
            )
    return out


def _glue_split(task: str, metric: str, split: str) -> tuple[str, str]:
    """(metric, Hub split) of a metric key from the GLUE table's evaluation splits: MNLI's ``accuracy`` on
    ``dev`` is ``accuracy`` on ``validation_matched``, its ``accuracy_mismatched`` is ``accuracy`` on
    ``validation_mismatched``; other tasks and splits are left as they are."""
    glue = GLUE.get(task)
    if glue is None or split != "validation" or len(glue.eval_splits) == 1:
        return metric, split
    for s in sorted(glue.eval_splits, key=lambda s: -len(s.suffix)):
        if s.suffix and metric.endswith(s.suffix):
            return metric.removesuffix(s.suffix), s.hub
    return metric, glue.eval_splits[0].hub


def speed_ratios(benchmark: Any) -> list[tuple[float, str]]:
    """(speed ratio vs the reference, description) pairs from a benchmark result JSON ([] when it has none).

    Accepts what ``sparse-nlp bench --json`` writes (``{"vs", "speedup": [{"batch", "seq", "ratio"}, ...]}``),
    ``{"speedup": 2.1, "setting": "..."}`` (also ``speed_ratio``), a list of such, or
    ``{"dense_s": a, "sparse_s": b}`` (ratio a / b).
    """
    if benchmark is None:
        return []
    if isinstance(benchmark, dict) and isinstance(benchmark.get("speedup"), list):
        vs = benchmark.get("vs")
        out = []
        for row in benchmark["speedup"]:
            text = ", ".join(f"{k} {row[k]}" for k in ("batch", "seq") if k in row)
            out.append((float(row["ratio"]), f"{text}; vs {vs}" if vs else text))
        return out
    rows = benchmark.get("rows", benchmark) if isinstance(benchmark, dict) else benchmark
    out = []
    for row in rows if isinstance(rows, list) else [rows]:
        if not isinstance(row, dict):
            continue
        text = str(row.get("setting") or row.get("description") or "")
        for key in ("speedup", "speed_ratio", "ratio"):
            if isinstance(row.get(key), (int, float)):
                out.append((float(row[key]), text))
                break
        else:
            if isinstance(row.get("dense_s"), (int, float)) and row.get("sparse_s"):
                out.append((float(row["dense_s"]) / float(row["sparse_s"]), text))
    return out


# ---- the card --------------------------------------------------------------------------------------------


def _tag(text: str) -> str:
    return str(text).lower().replace(":", "-").replace(" ", "-").replace("_", "-")


def default_evaluation(folder: Path) -> Any:
    """The evaluation JSON of a checkpoint folder: the first of `EVALUATION_FILES`, else all ``eval_*.json``."""
    for name in EVALUATION_FILES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("eval_*.json"))
    return [_load_json(p, "evaluation") for p in found] or None


def _notes(evaluation: Any) -> list[str]:
    """Free-text ``note`` entries of an evaluation JSON (how a number was measured), for the card."""
    items = evaluation.get("results", evaluation) if isinstance(evaluation, dict) else evaluation
    items = items if isinstance(items, list) else [items]
    return [
        f"{item.get('task', '')}: {item['note']}"
        for item in items
        if isinstance(item, dict) and item.get("note")
    ]


def render_model_card(
    model: Any,
    repo_id: str,
    *,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    evaluation: Any = None,
    benchmark: Any = None,
    compact: bool = False,
    template_path: str | os.PathLike | None = None,
    files: list[tuple[str, int]] | None = None,
):
    """Render the model card of a sparsified `model` (a `huggingface_hub.ModelCard`).

    Args:
        model: The loaded model; its sparsity is measured here with `sparse_nlp.report`.
        repo_id: ``org/name`` (the card's title and the code sample).
        base_model: Hub id of the dense model it came from (``base_model`` in the card metadata).
        datasets: Hub ids of the data sets used (calibration, fine-tuning, evaluation).
        evaluation: Evaluation JSON (path, dict or list): model-index results, see `eval_results`.
        benchmark: Benchmark result JSON (path or dict): the speed ratios, see `speed_ratios`.
        compact: Whether the uploaded weights are in the compact format (the card says how to load them).
        template_path: Jinja template; default ``sparse_nlp/templates/model_card.md`` (package data).
        files: (name, bytes) of the files uploaded beside the card, listed in a "Files" section.
    """
    from huggingface_hub import ModelCard, ModelCardData

    template = Path(template_path) if template_path else TEMPLATE
    if not template.is_file():
        raise FileNotFoundError(f"model card template {str(template)!r} does not exist.")
    config = read_metadata(model.config)
    measured = report(model)
    evaluation = _load_json(evaluation, "evaluation")
    results = eval_results(evaluation)
    speed = speed_ratios(_load_json(benchmark, "benchmark"))
    tags = ["sparse", "sparse-nlp"]
    weights, attention, structured = [], None, None
    if config is not None:
        for rule in config.weights:
            tags += [f"{_tag(rule.method)}-pruning", f"{_tag(rule.pattern)}-sparsity"]
            weights.append(rule)
        attention, structured = config.attention, config.structured
        if attention is not None:
            tags.append(f"{_tag(getattr(attention, 'pattern', 'sparse'))}-attention")
        if structured is not None:
            tags.append("structured-pruning")
        if config.activation is not None:
            tags.append(f"{_tag(config.activation.method)}-activation-sparsity")
    if compact:
        tags.append("sparse-nlp-compact")
    data_ids = list(datasets or [])
    for r in results:
        if r.dataset_type not in data_ids:
            data_ids.append(r.dataset_type)
    card_data = ModelCardData(
        base_model=base_model,
        datasets=data_ids or None,
        tags=list(dict.fromkeys(tags)),
        library_name="transformers",
        model_name=repo_id.split("/")[-1],
        eval_results=results or None,
    )
    groups = [
        {"name": g, "params": t.numel, "nonzeros": t.nonzeros, "sparsity": f"{t.sparsity:.2%}"}
        for g, t in measured.groups.items()
    ]
    return ModelCard.from_template(
        card_data,
        template_path=str(template),
        repo_id=repo_id,
        model_type=getattr(model.config, "model_type", "?"),
        architecture=type(model).__name__,
        base_model=base_model,
        weight_rules=weights,
        attention=attention,
        structured=structured,
        activation=config.activation if config is not None else None,
        activation_measured=measured.activation,
        recipe_json=config.to_json() if config is not None else None,
        groups=groups,
        masked_modules=sum(1 for r in measured.rows if r.masked),
        linear_modules=len(measured.rows),
        speed=speed,
        results=results,
        notes=_notes(evaluation),
        compact=compact,
        files=files or [],
        library_version=(getattr(model.config, METADATA_KEY, None) or {}).get("library_version"),
    )


# ---- push ------------------------------------------------------------------------------------------------


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def push_to_hub(
    model_or_dir: Any,
    repo_id: str,
    *,
    tokenizer: Any = None,
    compact: bool = False,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    evaluation: Any = None,
    benchmark: Any = None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    card: bool = True,
    include: list[str] | tuple[str, ...] = (),
    exclude: list[str] | tuple[str, ...] = (),
) -> PushResult:
    """Upload a sparse checkpoint and its generated model card to the Hub in one commit.

    Args:
        model_or_dir: A sparsified model (saved to a temporary folder first) or a folder written by
            `sparse_nlp.save_pretrained` (checked before anything is uploaded; never modified).
        repo_id: ``org/name``; created if it does not exist.
        tokenizer: Uploaded with a model (a folder carries its own).
        compact: Save a model in the compact format (a folder is uploaded as it is).
        base_model: Hub id of the dense model, for the card.
        datasets: Hub ids of the data sets used, for the card.
        evaluation: Evaluation JSON (path/dict/list); default: ``evaluation.json``, ``eval_results.json`` or
            ``results.json`` in the folder. Gives the card's model-index results.
        benchmark: Benchmark result JSON (path/dict); default ``benchmark.json`` or ``speed.json`` in the folder.
        commit_message: Commit message, as in huggingface_hub.
        private: Create the repository as private, as in huggingface_hub.
        token: Hub token, as in huggingface_hub.
        revision: Branch to commit to, as in huggingface_hub.
        create_pr: Open a pull request instead of committing, as in huggingface_hub.
        card: Upload a generated ``README.md`` (False: upload the folder's own README.md, if any).
        include: Glob patterns of more files to upload; by default exactly the checkpoint's manifest is
            uploaded (see `push_files`); pickles never are.
        exclude: Glob patterns of files that `include` added and that stay local.

    Returns:
        `PushResult` with the commit URL and the uploaded file names.

    Raises:
        HubError: the Hub refused the upload (the message names the repository, the status and the reason);
            nothing was committed.
        CheckpointError / MetadataError: the folder is damaged (named file); nothing was uploaded.
    """
    from transformers import PreTrainedModel

    opts = dict(
        base_model=base_model,
        datasets=datasets,
        evaluation=evaluation,
        benchmark=benchmark,
        commit_message=commit_message,
        private=private,
        token=token,
        revision=revision,
        create_pr=create_pr,
        card=card,
        include=tuple(include),
        exclude=tuple(exclude),
    )
    if isinstance(model_or_dir, PreTrainedModel):
        with tempfile.TemporaryDirectory(prefix="sparse-nlp-push-") as tmp:
            folder = save_pretrained(
                model_or_dir, Path(tmp) / "checkpoint", tokenizer=tokenizer, compact=compact
            )
            return _push_folder(folder, model_or_dir, repo_id, opts)
    folder = Path(model_or_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} does not exist.")
    verify_checkpoint(folder)
    model = from_pretrained(folder) if card else None
    return _push_folder(folder, model, repo_id, opts)


def _push_folder(folder: Path, model: Any, repo_id: str, args: dict[str, Any]) -> PushResult:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    raw = json.loads((folder / "config.json").read_text())
    is_compact = "compact" in (raw.get(METADATA_KEY) or {})
    files = push_files(folder, include=args["include"], exclude=args["exclude"])
    if not args["card"] and (folder / "README.md").is_file():
        files.append("README.md")
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
    if args["card"]:
        evaluation = args["evaluation"] or default_evaluation(folder)
        benchmark = args["benchmark"] or next(
            (folder / f for f in BENCHMARK_FILES if (folder / f).is_file()), None
        )
        rendered = render_model_card(
            model,
            repo_id,
            base_model=args["base_model"],
            datasets=args["datasets"],
            evaluation=evaluation,
            benchmark=benchmark,
            compact=is_compact,
            files=[(f, (folder / f).stat().st_size) for f in files],
        )
        operations.append(
            CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(rendered).encode())
        )
    api = HfApi(token=args["token"])
    where = f"{repo_id!r} at {_endpoint()}"
    try:
        api.create_repo(repo_id, private=args["private"], exist_ok=True)
        try:  # weight files of an earlier push that this one does not replace (dense <-> compact) go
            remote = api.list_repo_files(repo_id, revision=args["revision"])
        except (RepositoryNotFoundError, HfHubHTTPError):
            remote = []
        uploaded = {op.path_in_repo for op in operations}
        stale = [f for f in remote if f.endswith(_WEIGHT_SUFFIXES) and f not in uploaded]
        operations += [CommitOperationDelete(path_in_repo=f) for f in stale]
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=args["commit_message"]
            or f"Upload sparse checkpoint ({'compact' if is_compact else 'dense'}) with sparse_nlp",
            revision=args["revision"],
            create_pr=args["create_pr"],
        )
    except OfflineModeIsEnabled:
        raise HubError(f"push to {where} failed: HF_HUB_OFFLINE is set; unset it to upload.") from None
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", "?")
        reason = (getattr(err, "server_message", None) or str(err)).strip().splitlines()[0][:300]
        raise HubError(
            f"push to {where} failed: the Hub answered HTTP {status} ({reason}). Nothing was committed; "
            f"the local folder {str(folder)!r} is unchanged. Try again."
        ) from err
    except OSError as err:  # connection refused, DNS, timeouts
        raise HubError(
            f"push to {where} failed: {type(err).__name__}: {err}. Nothing was committed."
        ) from err
    logger.info("pushed %d files to %s (%s)", len(operations), repo_id, info.commit_url)
    return PushResult(
        repo_id=repo_id,
        commit_url=info.commit_url,
        commit_oid=info.oid,
        files=sorted(op.path_in_repo for op in operations if isinstance(op, CommitOperationAdd)),
    )


__all__ = [
    "CONFIG_FILE",
    "HubError",
    "PushResult",
    "eval_results",
    "push_files",
    "push_to_hub",
    "default_evaluation",
    "render_model_card",
    "speed_ratios",
]
