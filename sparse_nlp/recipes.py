"""Recipes: YAML files listing the stages of a run (fine-tune dense -> prune on a schedule with distillation
-> evaluate), parsed into typed dataclasses, and `run_recipe` that executes one end to end.

A recipe (see ``recipes/`` for complete ones)::

    model: minilm
    task: sst2
    max_length: 64
    stages:
      - name: dense
        type: finetune
        training: {epochs: 1, learning_rate: 5.0e-5, batch_size: 32}
      - name: gmp90
        type: prune
        sparsity: {weights: [{method: magnitude, sparsity: 0.9, targets: [all-linear]}]}
        schedule: {start_step: 0, end_step: 400, update_every: 25}
        distillation: {temperature: 2.0, alpha: 0.5}
        training: {max_steps: 600, learning_rate: 5.0e-5, batch_size: 32}
      - name: eval
        type: evaluate

A ``structured`` stage removes attention heads and FFN neurons in stages while it trains (see
`sparse_nlp.training.StructuredPruner`)::

      - name: h50-f50
        type: structured
        structured: {heads: 0.5, ffn: 0.5, score: taylor}
        removal: {stages: 3, steps_per_stage: 100, score_batches: 8}
        distillation: {temperature: 2.0, alpha: 0.9}
        training: {max_steps: 600, learning_rate: 1.0e-4, batch_size: 32}

A ``oneshot`` stage prunes in one pass (any registered method, with calibration data), and a ``prune`` stage
without ``sparsity`` and ``schedule`` recovers: it trains with the masks the model carries, kept exact. With a
text task (``wikitext2``, ``tinyshakespeare``, a ``.txt`` file) the same stages train a causal decoder::

    model: smollm2
    task: wikitext2
    max_length: 128
    stages:
      - name: wanda24
        type: oneshot
        sparsity: {weights: [{method: wanda, sparsity: 0.5, pattern: "2:4", targets: [all-linear]}]}
        calibration: {num_samples: 16, seq_len: 512}
      - name: recover
        type: prune
        teacher: start
        distillation: {temperature: 1.0, alpha: 1.0}
        training: {max_steps: 150, learning_rate: 1.0e-4, batch_size: 4}
      - name: eval
        type: evaluate
        perplexity: {context: 1024, max_windows: 4}

Parsing reuses the config machinery of `sparse_nlp.config`: an unknown or mistyped key fails with its
path (``stages[1].shedule``) and a suggestion. Recipes name registered methods only; nothing in a recipe
imports or executes code. The recipe is saved next to every checkpoint a run writes (``recipe.yaml``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import SparsityConfig, StructuredSparsity, _build
from .errors import ConfigError
from .evaluation.corpora import PERPLEXITY_TASKS, is_text_task
from .evaluation.custom import TaskSpec
from .evaluation.glue import EVALUABLE
from .models import resolve_device
from .pruning import movement as _movement  # noqa: F401  (registers the training-time method 'movement')
from .pruning.calibration import CUTS, CorpusWindows
from .pruning.masking import masked_modules
from .pruning.schedules import CubicSchedule
from .registry import suggest
from .report import measured_sparsity
from .structured import OPTION_DEFAULTS
from .training.distillation import DistillationConfig
from .training.structured import StructuredSchedule

logger = logging.getLogger(__name__)

STAGE_TYPES = ("finetune", "prune", "oneshot", "structured", "evaluate")
TEACHER_START = "start"
"""The ``teacher`` value naming the model the run started from (the recipe's model, or ``--start-from``)."""
TEXT_SPLITS = {"wikitext2": ("test", "valid"), "tinyshakespeare": ("train",)}
"""The splits an evaluate stage of a text task may score (WikiText-2 trains on valid: score test)."""
RECIPE_FILE = "recipe.yaml"
RESULTS_FILE = "results.json"


@dataclass
class TrainingSettings:
    """Optimisation settings of a training stage (stock ``TrainingArguments`` underneath)."""

    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; -1 = use epochs."})
    epochs: float = field(
        default=1.0, metadata={"help": "Passes over the training rows (when max_steps is -1)."}
    )
    learning_rate: float = 5e-5
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup: float = field(
        default=0.06, metadata={"help": "Warm-up: a fraction of the steps (< 1) or a step count."}
    )
    train_limit: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    save_steps: int = field(
        default=0, metadata={"help": "Checkpoint every N steps (0 = only the final model)."}
    )
    logging_steps: int = 50
    group_by_length: bool = field(
        default=False,
        metadata={
            "help": "Batch rows of similar length together (less padding; 1.8x faster SST-2 steps here)."
        },
    )

    def validate(self, path: str) -> None:
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"{path}.max_steps must be > 0 or -1 (use epochs), got {self.max_steps!r}.")
        for name in ("epochs", "learning_rate", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{path}.{name} must be > 0, got {getattr(self, name)!r}.")
        if self.weight_decay < 0 or self.warmup < 0 or self.save_steps < 0:
            raise ConfigError(f"{path}: weight_decay, warmup and save_steps must be >= 0.")
        if self.train_limit is not None and self.train_limit <= 0:
            raise ConfigError(f"{path}.train_limit must be > 0, got {self.train_limit!r}.")


@dataclass
class CalibrationSettings:
    """Calibration data of a ``oneshot`` stage (Wanda, SparseGPT, OWL profiles need activations).

    Attributes:
        source: A corpus (``wikitext2``: its valid split, ``tinyshakespeare``), a ``.txt`` file or a GLUE task
            (its training sentences); default: the recipe's task.
        num_samples: Calibration samples.
        seq_len: Tokens per sample; default: the recipe's ``max_length``.
        cut: How a corpus becomes samples: ``random`` windows (seeded), ``even``-ly spaced windows, or ``lines``.
        seed: Seed of the random windows.
    """

    source: str | None = None
    num_samples: int = 128
    seq_len: int | None = None
    cut: str = "random"
    seed: int = 0

    def validate(self, path: str) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"{path}.num_samples must be >= 1, got {self.num_samples!r}.")
        if self.seq_len is not None and self.seq_len < 2:
            raise ConfigError(f"{path}.seq_len must be >= 2, got {self.seq_len!r}.")
        if self.cut not in CUTS:
            raise ConfigError(
                f"{path}.cut must be one of {', '.join(CUTS)}, got {self.cut!r}.{suggest(self.cut, list(CUTS))}"
            )


@dataclass
class PerplexitySettings:
    """The perplexity protocol of an ``evaluate`` stage of a text task (see `sparse_nlp.evaluation.perplexity`).

    Attributes:
        context: Tokens per window; default 1024, or the model's positions when it has fewer.
        stride: Tokens between window starts; default ``context`` (no overlap).
        max_windows: Score only the first N windows; default all.
    """

    context: int | None = None
    stride: int | None = None
    max_windows: int | None = None

    def validate(self, path: str) -> None:
        if self.context is not None and self.context < 2:
            raise ConfigError(f"{path}.context must be >= 2 tokens, got {self.context!r}.")
        if self.stride is not None and (
            self.stride < 1 or (self.context is not None and self.stride > self.context)
        ):
            raise ConfigError(f"{path}.stride must be in [1, context], got {self.stride!r}.")
        if self.max_windows is not None and self.max_windows < 1:
            raise ConfigError(f"{path}.max_windows must be >= 1, got {self.max_windows!r}.")


@dataclass
class Stage:
    """One step of a recipe.

    Attributes:
        name: Folder name of the stage's output under ``--out``.
        type: ``finetune`` (dense training), ``prune`` (gradual weight pruning, optionally distilled),
            ``oneshot`` (one-shot pruning by any registered method: magnitude, Wanda, SparseGPT),
            ``structured`` (gradual removal of heads and FFN neurons, optionally distilled) or ``evaluate``.
        training: Optimisation settings (finetune, prune, structured).
        sparsity: Weight rules with their final sparsity (prune: methods ``magnitude`` or ``movement``; oneshot:
            any registered method). A prune stage without ``sparsity`` and ``schedule`` is a recovery: it
            trains the model with the masks it already carries (from a oneshot stage or a pruned
            ``--start-from`` model), kept exact.
        schedule: When the masks change (prune).
        calibration: Calibration data (oneshot).
        structured: Final head / FFN budgets, score and scope (structured).
        removal: When units are removed: ``stages``, ``steps_per_stage``, ``start_step``, ``score_batches``
            (structured).
        distillation: Distil from a teacher (prune, structured; omit for no teacher).
        teacher: Name of an earlier training stage whose model is the teacher, ``start`` (the model the run
            started from: the recipe's model or ``--start-from``), or a model folder (any value with a ``/``,
            e.g. ``runs/minilm-sst2-dense-epoch/dense``; relative to the working directory); default: the model
            as it was before this stage.
        split: Split to evaluate (evaluate): ``dev`` (default) or ``train`` for GLUE; for a text task ``test``
            (WikiText-2's default) or ``valid``, ``train`` for Tiny Shakespeare, none for a ``.txt`` file.
        perplexity: The perplexity protocol (evaluate, text tasks).
    """

    name: str
    type: str
    training: TrainingSettings | None = None
    sparsity: SparsityConfig | None = None
    schedule: CubicSchedule | None = None
    structured: StructuredSparsity | None = None
    removal: StructuredSchedule | None = None
    distillation: DistillationConfig | None = None
    teacher: str | None = None
    split: str | None = None
    calibration: CalibrationSettings | None = None
    perplexity: PerplexitySettings | None = None

    @property
    def is_recovery(self) -> bool:
        """A prune stage without sparsity rules: training that keeps the masks the model already has."""
        return self.type == "prune" and self.sparsity is None and self.schedule is None

    def validate(self, path: str) -> None:
        if self.type not in STAGE_TYPES:
            raise ConfigError(
                f"{path}.type must be one of {', '.join(STAGE_TYPES)}, got {self.type!r}.{suggest(self.type, list(STAGE_TYPES))}"
            )
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}", self.name):
            raise ConfigError(
                f"{path}.name must be a plain folder name inside --out: letters, digits, _ . - (not starting "
                f"with '.' or '-', no '/' or '\\', at most 100 characters), got {self.name!r}."
            )
        needs = {
            "finetune": ("training",),
            "prune": ("training",) if self.is_recovery else ("training", "sparsity", "schedule"),
            "oneshot": ("sparsity",),
            "structured": ("training", "structured", "removal"),
            "evaluate": (),
        }[self.type]
        for key in needs:
            if getattr(self, key) is None:
                raise ConfigError(f"{path}.{key} is required for a {self.type} stage.")
        unused = {
            "finetune": ("sparsity", "schedule", "structured", "removal", "distillation", "teacher"),
            "prune": ("structured", "removal"),
            "oneshot": ("training", "schedule", "structured", "removal", "distillation", "teacher"),
            "structured": ("sparsity", "schedule"),
            "evaluate": (
                "training",
                "sparsity",
                "schedule",
                "structured",
                "removal",
                "distillation",
                "teacher",
            ),
        }[self.type]
        unused += {
            "oneshot": ("split", "perplexity"),
            "evaluate": ("calibration",),
        }.get(self.type, ("calibration", "split", "perplexity"))
        for key in unused:
            if getattr(self, key) is not None:
                raise ConfigError(f"{path}.{key} has no meaning in a {self.type} stage; remove it.")
        if self.training is not None:
            self.training.validate(f"{path}.training")
        if self.sparsity is not None:
            try:
                self.sparsity.validate()
            except ConfigError as err:
                raise ConfigError(f"{path}.sparsity.{err}") from None
            if not self.sparsity.weights:
                raise ConfigError(f"{path}.sparsity.weights is empty; a prune stage needs at least one rule.")
        if self.schedule is not None:
            self.schedule.validate(f"{path}.schedule")
            if (
                self.training is not None
                and self.training.max_steps > 0
                and self.schedule.end_step > self.training.max_steps
            ):
                raise ConfigError(
                    f"{path}.schedule.end_step ({self.schedule.end_step}) is after the last step "
                    f"({path}.training.max_steps = {self.training.max_steps}); the final sparsity would never be reached."
                )
        if self.structured is not None:
            self._validate_structured(path)
        if self.calibration is not None:
            self.calibration.validate(f"{path}.calibration")
        if self.perplexity is not None:
            self.perplexity.validate(f"{path}.perplexity")

    def validate_for_task(self, task: str, path: str) -> None:
        """The checks that depend on the recipe's task (a split the task has, perplexity only for text)."""
        if not is_text_task(task):
            if self.split not in (None, "dev", "train", "validation"):
                raise ConfigError(f"{path}.split must be dev or train, got {self.split!r}.")
            if self.perplexity is not None:
                raise ConfigError(
                    f"{path}.perplexity is for text tasks ({', '.join(PERPLEXITY_TASKS)}, a .txt file); "
                    f"task {task!r} is scored by its own metric. Remove it."
                )
        elif self.split is not None:
            splits = TEXT_SPLITS.get(task, ())
            if self.split not in splits:
                choices = f"one of {', '.join(splits)}" if splits else "left out (a .txt file is one text)"
                raise ConfigError(
                    f"{path}.split of text task {task!r} must be {choices}, got {self.split!r}."
                )

    def _validate_structured(self, path: str) -> None:
        self.structured.validate(f"{path}.structured")
        unknown = sorted(set(self.structured.options) - set(OPTION_DEFAULTS))
        if unknown:
            raise ConfigError(
                f"{path}.structured.options: unknown option(s) {unknown}; known: {', '.join(OPTION_DEFAULTS)}."
            )
        if self.removal is None or self.training is None:
            return
        self.removal.validate(f"{path}.removal")
        if self.training.max_steps > 0 and self.removal.last_step >= self.training.max_steps:
            raise ConfigError(
                f"{path}.removal: the last removal (step {self.removal.last_step} = start_step + (stages - 1) * "
                f"steps_per_stage) is not before the last step ({path}.training.max_steps = "
                f"{self.training.max_steps}); the model would not train after it."
            )
        if self.training.save_steps:
            raise ConfigError(
                f"{path}.training.save_steps must be 0 in a structured stage: the layers change shape during "
                "the stage, so it cannot resume from an intermediate checkpoint (the final model is saved)."
            )


def is_teacher_folder(teacher: str) -> bool:
    """A stage's `teacher` names a model folder (rather than an earlier stage) when it contains a path separator."""
    return "/" in teacher or os.sep in teacher


@dataclass
class Recipe:
    """A run: a starting model, a task and the stages applied in order.

    ``task`` is a GLUE task name (``mrpc``), a description of your own data (a mapping, see
    `sparse_nlp.evaluation.custom.TaskSpec`), or a text corpus (``wikitext2``, ``tinyshakespeare`` or a ``.txt``
    file: a causal decoder is trained on windows of ``max_length`` tokens and scored by perplexity; see
    `sparse_nlp.evaluation.causal`).
    """

    model: str
    task: Any
    stages: list[Stage]
    max_length: int = 128
    seed: int = 42

    def validate(self) -> Recipe:
        if isinstance(self.task, dict):
            self.task = TaskSpec.from_dict(self.task, "task")
        elif isinstance(self.task, TaskSpec):
            self.task.validate("task")
        elif not is_text_task(self.task) and (not isinstance(self.task, str) or self.task not in EVALUABLE):
            known = [*EVALUABLE, *PERPLEXITY_TASKS]
            raise ConfigError(
                f"task must be a GLUE task ({', '.join(EVALUABLE)}), a text corpus ({', '.join(PERPLEXITY_TASKS)}) "
                "or a .txt file (a causal LM), or a description of your own data (a mapping with kind, data_files "
                f"or dataset, text, label), got {self.task!r}."
                f"{suggest(self.task, known) if isinstance(self.task, str) else ''}"
            )
        if self.max_length < 8:
            raise ConfigError(f"max_length must be >= 8, got {self.max_length!r}.")
        if not self.stages:
            raise ConfigError("stages is empty; list at least one stage.")
        names = set()
        for i, stage in enumerate(self.stages):
            stage.validate(f"stages[{i}]")
            stage.validate_for_task(self.task, f"stages[{i}]")
            if stage.name == TEACHER_START:
                raise ConfigError(
                    f"stages[{i}].name {TEACHER_START!r} is reserved: teacher: {TEACHER_START} names the model the "
                    "run started from. Rename the stage."
                )
            if (
                stage.teacher is not None
                and stage.teacher != TEACHER_START
                and not is_teacher_folder(stage.teacher)
                and stage.teacher not in names
            ):
                raise ConfigError(
                    f"stages[{i}].teacher {stage.teacher!r} is not an earlier stage (nor a folder: a path has a '/')."
                    f"{suggest(stage.teacher, sorted(names))}"
                )
            if stage.name in names:
                raise ConfigError(
                    f"stages[{i}].name {stage.name!r} is used twice; stage names are folder names."
                )
            names.add(stage.name)
        return self

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        return _build(cls, data, "").validate()

    @property
    def task_name(self) -> str:
        """The task's name (a GLUE name, or the description's ``name``)."""
        return self.task.name if isinstance(self.task, TaskSpec) else self.task

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if isinstance(self.task, TaskSpec):
            out["task"] = self.task.to_dict()
        for stage, raw in zip(self.stages, out["stages"]):
            if stage.sparsity is not None:
                raw["sparsity"] = stage.sparsity.to_dict()
            for key in [k for k, v in raw.items() if v is None]:
                del raw[key]
        return out

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_yaml())


def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """Safe YAML that also reads ``5e-5`` as a float (YAML 1.1 wants ``5.0e-5``)."""

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
        ),
        list("-+0123456789."),
    )
    return Loader


EXTENDS_KEY = "extends"


def resolve_extends(data: Any, path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> Any:
    """Apply a recipe's ``extends: BASE.yaml`` key: load BASE (relative to the file that names it, itself
    resolved the same way) and merge this file's keys over it.

    Merge rules (JSON Merge Patch, RFC 7396, plus one rule for named lists): a mapping merges key by key,
    recursively; ``null`` deletes the key (so a setting falls back to its default); any other value, a list
    included, replaces the base value. When the base value is a list of mappings that all have a ``name``
    (``stages``) and the override is a mapping, each key of the override names one item, which is merged
    the same way (``null`` removes the item); a name the base does not have is an error.

    Raises:
        ConfigError: The base file is missing or not valid YAML, a chain of ``extends`` returns to a file
            already in it, or an override names a stage the base does not have.
    """
    import yaml

    path = Path(path).resolve()
    chain = (*_chain, path)
    if not isinstance(data, dict) or EXTENDS_KEY not in data:
        return data
    data = dict(data)
    ref = data.pop(EXTENDS_KEY)
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{path}: extends must be the path of a base recipe, got {ref!r}.")
    base_path = (path.parent / ref).resolve()
    if base_path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, base_path))
        raise ConfigError(f"{path}: extends makes a cycle ({cycle}); a recipe cannot extend itself.")
    if not base_path.is_file():
        raise ConfigError(
            f"{path}: extends names {ref!r}, but {base_path} does not exist (the path is relative to the "
            "recipe that names it)."
        )
    try:
        base = yaml.load(base_path.read_text(), Loader=_yaml_loader())  # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise ConfigError(f"{base_path}: not valid YAML: {err}") from None
    if not isinstance(base, dict):
        raise ConfigError(f"{base_path}: a base recipe must be a mapping of keys, got {type(base).__name__}.")
    base = resolve_extends(base, base_path, chain)

    def merge(old: Any, new: Any, where: str) -> Any:
        if (
            isinstance(new, dict)
            and isinstance(old, list)
            and old
            and all(isinstance(item, dict) and "name" in item for item in old)
        ):
            names = [item["name"] for item in old]
            unknown = [name for name in new if name not in names]
            if unknown:
                raise ConfigError(
                    f"{path}: {where} names {unknown[0]!r}, which {base_path.name} does not have "
                    f"(it has {', '.join(map(str, names))}).{suggest(str(unknown[0]), [str(n) for n in names])}"
                )
            return [
                merge(item, new[item["name"]], f"{where}.{item['name']}") if item["name"] in new else item
                for item in old
                if not (item["name"] in new and new[item["name"]] is None)
            ]
        if not isinstance(new, dict):
            return copy.deepcopy(new)
        out = copy.deepcopy(old) if isinstance(old, dict) else {}
        for key, value in new.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = merge(out.get(key), value, f"{where}.{key}" if where else str(key))
        return out

    return merge(base, data, "")


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Parse and validate a YAML recipe; errors name the file and the bad key.

    A recipe may name a base recipe with ``extends:`` (see `resolve_extends`); the result is the merged recipe.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(path)!r} does not exist.")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not a text recipe (byte {err.start} is not UTF-8); a recipe is a UTF-8 YAML file."
        ) from None
    try:
        data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    data = resolve_extends(data, path)
    try:
        return Recipe.from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


# ---- running -------------------------------------------------------------------------------------------


def _training_args(settings: TrainingSettings, output_dir: Path, seed: int, progress: bool, device=None):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=settings.max_steps,
        num_train_epochs=settings.epochs,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=64,
        train_sampling_strategy="group_by_length" if settings.group_by_length else "random",
        save_strategy="steps" if settings.save_steps else "no",
        save_steps=settings.save_steps or 500,
        save_total_limit=None,  # KeepNewestComplete deletes old checkpoints once a newer one is complete
        eval_strategy="no",
        logging_steps=settings.logging_steps,
        report_to=[],
        seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=not progress,
        use_cpu=device is None or device.type == "cpu",
    )


FSDP_ENV = "ACCELERATE_USE_FSDP"
"""Set by ``accelerate launch`` with the FSDP plugin (``--use_fsdp`` or an FSDP config file)."""


def check_not_fsdp(recipe: Recipe) -> None:
    """Refuse recipes that prune under accelerate's FSDP plugin. The pruning state itself handles parameters
    sharded by FSDP2 (`sparse_nlp.pruning.masking.mask_like_weight`, `GradualPruner` scoring gathered weights;
    tested with ``fully_shard`` on 2 CPU processes), but a recipe also hands the model from stage to stage
    (teacher copies, one-shot calibration, ``save_pretrained`` of every stage), which is not written for a
    sharded model, and accelerate cannot run its FSDP plugin on CPU to test it.

    Raises:
        ConfigError: Running under ``accelerate launch`` with FSDP and the recipe has a stage that prunes.
    """
    if os.environ.get(FSDP_ENV, "false").strip().lower() not in ("1", "true", "yes"):
        return
    pruning = [s.name for s in recipe.stages if s.type not in ("finetune", "evaluate")]
    if pruning:
        raise ConfigError(
            f"stages {pruning} prune, and this run is under accelerate's FSDP plugin ({FSDP_ENV}=true): "
            "recipes hand whole models from stage to stage and do not support sharded ones yet. Launch with "
            "data parallelism (accelerate launch --multi_gpu, without --use_fsdp) or on one process; a "
            "hand-written loop can prune FSDP2-sharded parameters with GradualPruner."
        )


def _device_name(device) -> str:
    import torch

    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def _resume_point(stage: Stage, trainer_dir: Path, *, pruning: bool) -> Path | None:
    """The newest complete Trainer checkpoint of a stage; says (on stderr) which one and why newer ones were skipped."""
    import sys

    from .training.resume import newest_complete

    chosen, skipped = newest_complete(trainer_dir, pruning)
    for folder, why in skipped:
        print(f"stage {stage.name}: skipping {folder.name}: {why}", file=sys.stderr)
    if chosen is not None:
        print(f"stage {stage.name}: resuming from {chosen}", file=sys.stderr)
    else:
        print(
            f"stage {stage.name}: no complete checkpoint in {trainer_dir}; starting the stage afresh",
            file=sys.stderr,
        )
    return chosen


def run_recipe(
    recipe: Recipe,
    out: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    start_from: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | None = "auto",
) -> dict[str, Any]:
    """Run every stage of `recipe`, writing checkpoints, ``recipe.yaml`` and ``results.json`` under `out`.

    A GLUE task trains a sequence classifier on the task's rows; a text task (`is_text_task`: ``wikitext2``,
    ``tinyshakespeare``, a ``.txt`` file) trains a causal decoder on windows of ``max_length`` tokens of the
    corpus (`sparse_nlp.evaluation.causal`) and its evaluate stages report perplexity with the protocol.

    Args:
        recipe: A validated `Recipe`.
        out: Output folder: ``<out>/<stage name>/`` per training or oneshot stage, ``<out>/results.json``.
        data_dir: Local data directory: GLUE TSVs, text corpora (default ``$SPARSE_NLP_DATA_DIR``, then the
            Hub); a described task reads its own files.
        start_from: An already fine-tuned model: finetune stages are skipped and the run starts from it.
        resume: Resume a prune/finetune stage from its latest Trainer checkpoint when there is one.
        progress: Show progress bars.
        device: ``auto`` (a CUDA GPU when torch sees one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``. The
            model, its teacher, the pruning state and evaluation all run there; ``results.json`` records it.

    Returns:
        The results dict (also written to ``results.json``): per stage its wall time, steps, measured
        sparsity and metrics.
    """
    import torch
    from transformers import DataCollatorWithPadding, Trainer, default_data_collator

    from .checkpoint import recover, save_pretrained
    from .evaluation import causal
    from .evaluation.data import resolve_data_dir
    from .evaluation.tasks import encode_glue, evaluate_glue, load_for_task, load_rows, task_info
    from .sparsify import sparsify
    from .training.callback import SparsityCallback, StructuredCallback
    from .training.distillation import Distiller
    from .training.pruner import GradualPruner
    from .training.resume import KeepNewestComplete
    from .training.structured import StructuredPruner

    recipe.validate()
    text_task = is_text_task(recipe.task)
    device = resolve_device(device)
    if device.type == "cuda" and device.index is not None:  # the Trainer trains on the current CUDA device
        torch.cuda.set_device(device)
    check_not_fsdp(recipe)
    if not text_task:
        task_info(recipe.task)
    resolve_data_dir(data_dir)  # a missing directory fails before any work
    trains = any(
        s.type not in ("evaluate", "oneshot") and not (s.type == "finetune" and start_from)
        for s in recipe.stages
    )
    if isinstance(
        recipe.task, TaskSpec
    ):  # bad columns or labels of your own data fail before the model loads
        for split in ("train", "dev") if trains else ("dev",):
            load_rows(recipe.task, split)
    for i, stage in enumerate(recipe.stages):  # and so does a teacher folder without a model
        if (
            stage.teacher
            and is_teacher_folder(stage.teacher)
            and not (Path(stage.teacher) / "config.json").is_file()
        ):
            raise ConfigError(
                f"stages[{i}].teacher: no model (config.json) in {Path(stage.teacher).resolve()}; a teacher with "
                "a '/' is a model folder, relative to the working directory (name an earlier stage without '/')."
            )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recipe.save(out / RECIPE_FILE)
    torch.manual_seed(recipe.seed)
    source = str(start_from) if start_from is not None else recipe.model

    def load(name: str):  # (model, tokenizer) for the recipe's task
        return causal.load_causal_lm(name, recipe.task) if text_task else load_for_task(name, recipe.task)

    model, tokenizer = load(source)
    model.to(device)  # before any pruner is built, so masks and movement scores live beside the weights
    results: dict[str, Any] = {
        "model": source,
        "task": recipe.task_name,
        "device": _device_name(device),
        "seed": recipe.seed,
        "stages": [],
    }
    if text_task:
        results["train_text"] = causal.training_split(recipe.task)
    # text windows all have max_length tokens: no padding (and decoders often have no pad token)
    collator = default_data_collator if text_task else DataCollatorWithPadding(tokenizer)
    train_cache: dict[int | None, list] = {}
    stage_models: dict[str, str] = {TEACHER_START: source}  # stage name -> folder of the model it wrote

    def train_rows(limit: int | None) -> list:
        if limit not in train_cache:
            if text_task:
                train_cache[limit] = causal.text_windows(
                    tokenizer, recipe.task, max_length=recipe.max_length, data_dir=data_dir, limit=limit
                )
            else:
                train_cache[limit] = encode_glue(
                    tokenizer,
                    recipe.task,
                    "train",
                    data_dir=data_dir,
                    max_length=recipe.max_length,
                    limit=limit,
                )
        return train_cache[limit]

    def write_results() -> None:
        (out / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")

    # every data file the run will need is read up front: a missing one fails before hours of training
    if trains:
        train_rows(None)
    if text_task:
        for stage in recipe.stages:
            if stage.type == "evaluate":
                causal.check_eval_split(recipe.task, stage.split, data_dir)
    else:
        encode_glue(tokenizer, recipe.task, "dev", data_dir=data_dir, max_length=recipe.max_length, limit=1)

    for stage in recipe.stages:
        record: dict[str, Any] = {"name": stage.name, "type": stage.type}
        start = time.perf_counter()
        if stage.type == "finetune" and start_from is not None:
            record["skipped"] = f"started from {start_from}"
            stage_models[stage.name] = str(start_from)
            results["stages"].append(record)
            continue
        if stage.type == "evaluate" and text_task:
            protocol = stage.perplexity or PerplexitySettings()
            record.update(
                causal.evaluate_text(
                    model,
                    tokenizer,
                    recipe.task,
                    split=stage.split,
                    data_dir=data_dir,
                    context=protocol.context,
                    stride=protocol.stride,
                    max_windows=protocol.max_windows,
                    progress=progress,
                )
            )
            record.update(measured_sparsity(model))
        elif stage.type == "evaluate":
            record.update(
                evaluate_glue(
                    model,
                    tokenizer,
                    recipe.task,
                    data_dir=data_dir,
                    split=stage.split or "dev",
                    max_length=recipe.max_length,
                    progress=progress,
                )
            )
            record.update(measured_sparsity(model))
        elif stage.type == "oneshot":
            stage_dir = out / stage.name
            calibration = stage.calibration or CalibrationSettings()
            calibration_source = calibration.source or recipe.task
            data = (
                CorpusWindows(calibration_source, calibration.cut, calibration.seed, data_dir)
                if is_text_task(calibration_source)
                else calibration_source
            )
            sparsify(
                model,
                stage.sparsity,
                data=data,
                tokenizer=tokenizer,
                num_samples=calibration.num_samples,
                seq_len=calibration.seq_len or recipe.max_length,
                progress=progress,
            )
            record.update(measured_sparsity(model))
            record["calibration"] = {
                "source": calibration_source,
                "num_samples": calibration.num_samples,
                "seq_len": calibration.seq_len or recipe.max_length,
                "cut": calibration.cut,
                "seed": calibration.seed,
            }
            save_pretrained(model, stage_dir, tokenizer=tokenizer)
            recipe.save(stage_dir / RECIPE_FILE)
            stage_models[stage.name] = str(stage_dir)
            record["checkpoint"] = str(stage_dir)
        else:
            stage_dir = out / stage.name
            settings = stage.training
            args = _training_args(settings, stage_dir / "trainer", recipe.seed, progress, device)
            callbacks, loss_func, pruner, structured = [], None, None, None
            if stage.distillation is not None:
                teacher = (
                    load(stage_models.get(stage.teacher, stage.teacher))[0]
                    if stage.teacher
                    else copy.deepcopy(model)
                ).to(device)
                loss_func = Distiller(model, teacher, stage.distillation)  # casts it to teacher_dtype
                del teacher
            if stage.is_recovery:
                if not any(True for _ in masked_modules(model)):
                    raise ConfigError(
                        f"stage {stage.name!r} is a prune stage without sparsity (a recovery that keeps the "
                        "model's masks), but the model has no masks: add sparsity and schedule, or run a oneshot "
                        "or prune stage (or --start-from a pruned model) before it."
                    )
            elif stage.type == "prune":
                pruner = GradualPruner(model, stage.sparsity, stage.schedule)
                callbacks.append(SparsityCallback(pruner))
            elif stage.type == "structured":
                structured = StructuredPruner(model, stage.structured, stage.removal)
                callbacks.append(StructuredCallback(structured))
            callbacks.append(KeepNewestComplete(pruning=pruner is not None))
            trainer = Trainer(
                model=model,
                args=args,
                train_dataset=train_rows(settings.train_limit),
                data_collator=collator,
                callbacks=callbacks,
                compute_loss_func=loss_func,
            )
            if resume:  # a save killed while switching the stage folder: its Trainer folder comes back
                recover(stage_dir)
            checkpoint = (
                _resume_point(stage, stage_dir / "trainer", pruning=pruner is not None) if resume else None
            )
            output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            if checkpoint is not None:
                record["resumed_from"] = checkpoint.name
            if loss_func is not None:
                loss_func.remove()
            record.update(steps=trainer.state.global_step, train_loss=round(float(output.training_loss), 4))
            if pruner is not None:
                record.update(sparsity=round(pruner.sparsity(), 4), mask_frozen_after=stage.schedule.end_step)
            elif stage.is_recovery:
                record.update(measured_sparsity(model), masks="kept")
            if structured is not None:
                record.update(structured.summary())
            save_pretrained(model, stage_dir, tokenizer=tokenizer)
            recipe.save(stage_dir / RECIPE_FILE)
            stage_models[stage.name] = str(stage_dir)
            record["checkpoint"] = str(stage_dir)
        record["wall_seconds"] = round(time.perf_counter() - start, 1)
        results["stages"].append(record)
        write_results()
        logger.info("stage %s done in %.0f s", stage.name, record["wall_seconds"])
    write_results()
    return results
