"""Recipes: YAML parsing into typed stages, errors that name the bad key, and a tiny end-to-end run through
the CLI (fine-tune -> prune with distillation -> evaluate) with the recipe saved next to each checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sparse_nlp import from_pretrained
from sparse_nlp.cli import main
from sparse_nlp.config import ConfigError
from sparse_nlp.evaluation.data import DataError
from sparse_nlp.pruning.masking import masked_modules
from sparse_nlp.recipes import STAGE_TYPES, Recipe, load_recipe, resolve_extends, run_recipe
from sparse_nlp.training.distillation import Distiller

from .tiny_glue import tiny_bert_folder, tiny_glue_dir

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
EXPERIMENTS = ROOT / "benchmarks" / "experiments"

TINY = """
model: {model}
task: sst2
max_length: 32
stages:
  - name: dense
    type: finetune
    training: {{max_steps: 6, learning_rate: 1e-3, batch_size: 8, logging_steps: 100}}
  - name: gmp
    type: prune
    teacher: dense
    sparsity: {{weights: [{{method: magnitude, sparsity: 0.8, targets: [all-linear]}}]}}
    schedule: {{start_step: 0, end_step: 6, update_every: 2}}
    distillation: {{temperature: 2.0, alpha: 0.5}}
    training: {{max_steps: 8, learning_rate: 1e-3, batch_size: 8, logging_steps: 100}}
  - name: eval
    type: evaluate
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@dataclass
class TinyRun:
    """The TINY recipe run once through the CLI with its own seed; tests read its outputs (and write only new
    files beside them)."""

    model_dir: Path
    data_dir: Path
    recipe: Path
    out: Path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> TinyRun:
    root = tmp_path_factory.mktemp("tiny-run")
    model_dir = tiny_bert_folder(root / "model")
    data_dir = tiny_glue_dir(root / "data")
    recipe = _write(root, TINY.format(model=model_dir))
    out = root / "out"
    assert main(["run", str(recipe), "--data-dir", str(data_dir), "--out", str(out), "--no-progress"]) == 0
    return TinyRun(model_dir, data_dir, recipe, out)


@pytest.mark.parametrize(
    "path",
    sorted(RECIPES.glob("*.yaml")) + sorted(EXPERIMENTS.glob("*.yaml")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_shipped_recipes_parse_and_round_trip(path, tmp_path):
    recipe = load_recipe(path)
    assert recipe.stages and {s.type for s in recipe.stages} <= set(STAGE_TYPES)
    recipe.save(tmp_path / "again.yaml")
    assert load_recipe(tmp_path / "again.yaml") == recipe


def test_experiments_extend_a_recipe():
    """Every experiment is an override of a shipped recipe (directly or through another experiment)."""
    experiments = sorted(EXPERIMENTS.glob("*.yaml"))
    assert experiments
    for path in experiments:
        assert path.read_text().count("\nextends: ") == 1, f"{path.name} has no extends: key"


def test_extends_merges_mappings_replaces_lists_and_null_deletes(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "base.yaml").write_text(TINY.format(model="m"))
    override = tmp_path / "override.yaml"
    override.write_text(
        "extends: base/base.yaml\n"
        "max_length: 48\n"
        "stages:\n"
        "  gmp:\n"
        "    schedule: {end_step: 4}\n"  # one key of a stage's mapping: the others stay
        "    distillation: null\n"  # null deletes the key
        "    training: {learning_rate: 2e-3, max_steps: null}\n"
        "    sparsity: {weights: [{method: magnitude, sparsity: 0.5}]}\n"  # a list replaces the base list
    )
    base, recipe = load_recipe(tmp_path / "base" / "base.yaml"), load_recipe(override)
    assert recipe.max_length == 48 and recipe.model == base.model and recipe.task == base.task
    assert [s.name for s in recipe.stages] == ["dense", "gmp", "eval"]
    assert recipe.stages[0] == base.stages[0] and recipe.stages[2] == base.stages[2]
    gmp = recipe.stages[1]
    assert gmp.schedule.end_step == 4 and gmp.schedule.update_every == 2 and gmp.schedule.start_step == 0
    assert gmp.distillation is None and gmp.teacher == "dense"
    assert gmp.training.learning_rate == pytest.approx(2e-3) and gmp.training.batch_size == 8
    assert gmp.training.max_steps == -1  # back to its default
    assert gmp.sparsity.weights[0].sparsity == 0.5 and gmp.sparsity.weights[0].targets == ["all-linear"]


def test_extends_removes_a_named_stage_and_replaces_the_list(tmp_path):
    (tmp_path / "base.yaml").write_text(TINY.format(model="m"))
    removed = tmp_path / "removed.yaml"
    removed.write_text("extends: base.yaml\nstages:\n  eval: null\n")
    assert [s.name for s in load_recipe(removed).stages] == ["dense", "gmp"]
    replaced = tmp_path / "replaced.yaml"
    replaced.write_text("extends: base.yaml\nstages:\n  - {name: only, type: evaluate}\n")
    assert [s.name for s in load_recipe(replaced).stages] == ["only"]


def test_extends_chains_relative_to_each_file(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "base.yaml").write_text(TINY.format(model="m"))
    (tmp_path / "middle.yaml").write_text("extends: a/base.yaml\nseed: 7\n")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "top.yaml").write_text("extends: ../middle.yaml\nmax_length: 16\n")
    recipe = load_recipe(tmp_path / "b" / "top.yaml")
    assert (recipe.seed, recipe.max_length, len(recipe.stages)) == (7, 16, 3)
    # the merged recipe is saved whole: it loads without its bases
    recipe.save(tmp_path / "saved.yaml")
    assert "extends" not in (tmp_path / "saved.yaml").read_text()
    assert load_recipe(tmp_path / "saved.yaml") == recipe


def test_extends_missing_base_names_the_file(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text("extends: nowhere/base.yaml\nseed: 1\n")
    with pytest.raises(
        ConfigError, match=r"override\.yaml: extends names 'nowhere/base\.yaml'.*base\.yaml does not exist"
    ):
        load_recipe(override)


def test_extends_refuses_cycles(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nseed: 1\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"cycle.*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "self.yaml").write_text("extends: self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(tmp_path / "self.yaml")


def test_extends_unknown_stage_name_is_an_error(tmp_path):
    (tmp_path / "base.yaml").write_text(TINY.format(model="m"))
    override = tmp_path / "override.yaml"
    override.write_text("extends: base.yaml\nstages:\n  gnp: {teacher: dense}\n")
    with pytest.raises(ConfigError, match=r"stages names 'gnp'.*dense, gmp, eval.*Did you mean 'gmp'"):
        load_recipe(override)


def test_resolve_extends_leaves_plain_data_alone(tmp_path):
    data = {"model": "m", "stages": [{"name": "e", "type": "evaluate"}]}
    assert resolve_extends(data, tmp_path / "x.yaml") is data


def test_yaml_floats_without_dot_are_numbers(tmp_path):
    recipe = load_recipe(_write(tmp_path, TINY.format(model="m")))
    assert recipe.stages[0].training.learning_rate == pytest.approx(1e-3)
    assert recipe.stages[1].schedule.end_step == 6
    assert recipe.stages[1].sparsity.weights[0].sparsity == 0.8


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("    schedule:", "    shedule:", r"stages\[1\]\.shedule.*Did you mean 'schedule'"),
        (
            "max_steps: 6, learning_rate: 1e-3",
            "max_steps: 6, learning_rate: fast",
            r"stages\[0\]\.training\.learning_rate must be a number",
        ),
        ("type: evaluate", "type: evaluation", r"stages\[2\]\.type.*Did you mean 'evaluate'"),
        ("method: magnitude", "method: magnitud", r"stages\[1\]\.sparsity\.weights\[0\]\.method.*magnitude"),
        ("teacher: dense", "teacher: dence", r"stages\[1\]\.teacher 'dence'.*Did you mean 'dense'"),
        ("end_step: 6,", "end_step: 60,", r"end_step \(60\) is after the last step"),
        ("alpha: 0.5", "alpha: 1.5", r"alpha must be in \[0, 1\]"),
        ("max_length: 32", "max_lenght: 32", r"unknown field 'max_lenght'.*Did you mean 'max_length'"),
    ],
)
def test_bad_recipe_names_the_key(tmp_path, old, new, message):
    text = TINY.format(model="m")
    assert old in text
    with pytest.raises(ConfigError, match=message) as err:
        load_recipe(_write(tmp_path, text.replace(old, new, 1)))
    assert "recipe.yaml" in str(err.value)


def test_prune_stage_needs_schedule():
    data = {
        "model": "m",
        "task": "sst2",
        "stages": [{"name": "p", "type": "prune", "training": {}, "sparsity": {"weights": [{}]}}],
    }
    with pytest.raises(ConfigError, match=r"stages\[0\]\.schedule is required"):
        Recipe.from_dict(data)


def test_cli_seed_overrides_the_recipe(tmp_path, tiny_run):
    """`--seed` repeats a run with another seed: it is recorded in results.json and the saved recipe, and it
    changes the training (the Trainer shuffles with it)."""
    recipe, data_dir = tiny_run.recipe, tiny_run.data_dir
    losses = {}
    for seed in (None, 7):
        out = tiny_run.out if seed is None else tmp_path / f"out-{seed}"  # None: the recipe's own seed
        if seed is not None:
            argv = ["run", str(recipe), "--data-dir", str(data_dir), "--out", str(out), "--no-progress"]
            assert main(argv + ["--seed", str(seed)]) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["seed"] == (42 if seed is None else seed)
        assert load_recipe(out / "recipe.yaml").seed == results["seed"]
        losses[seed] = [s["train_loss"] for s in results["stages"] if "train_loss" in s]
    assert losses[None] != losses[7]


def test_cli_run_end_to_end_tiny(tmp_path, capsys, tiny_run):
    data_dir, recipe, out = tiny_run.data_dir, tiny_run.recipe, tiny_run.out  # `sparse-nlp run` exited 0
    results = json.loads((out / "results.json").read_text())
    stages = {s["name"]: s for s in results["stages"]}
    assert stages["gmp"]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert stages["eval"]["num_examples"] == 64 and 0 <= stages["eval"]["accuracy"] <= 100
    assert stages["eval"]["block_sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert all(s["wall_seconds"] >= 0 for s in results["stages"])
    # the recipe lies next to each checkpoint, and the sparse checkpoint reloads with its masks
    assert load_recipe(out / "gmp" / "recipe.yaml") == load_recipe(recipe)
    model = from_pretrained(out / "gmp")
    assert len(list(masked_modules(model))) == 12
    # the evaluate command scores the checkpoint and writes the same accuracy as the recipe's evaluate stage
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                str(out / "gmp"),
                "--task",
                "sst2",
                "--data-dir",
                str(data_dir),
                "--max-length",
                "32",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["accuracy"] == stages["eval"]["accuracy"]
    assert json.loads((out / "gmp" / "eval_sst2.json").read_text())["accuracy"] == printed["accuracy"]
    # start from the fine-tuned model: the finetune stage is skipped, the teacher is that model
    again = run_recipe(
        load_recipe(recipe), tmp_path / "out2", data_dir=data_dir, start_from=out / "dense", progress=False
    )
    assert again["stages"][0]["skipped"].startswith("started from")
    assert torch.is_tensor(next(from_pretrained(tmp_path / "out2" / "gmp").parameters()))


def test_run_with_data_dir_lacking_task_files_lists_paths(tmp_path, capsys):
    model_dir = tiny_bert_folder(tmp_path / "model")
    empty = tmp_path / "empty"
    empty.mkdir()
    recipe = _write(tmp_path, TINY.format(model=model_dir))
    assert (
        main(["run", str(recipe), "--data-dir", str(empty), "--out", str(tmp_path / "out"), "--no-progress"])
        == 2
    )
    err = capsys.readouterr().err
    assert "no sst2 train split" in err and str(empty / "glue" / "sst2" / "train.tsv") in err
    with pytest.raises(DataError, match="looked for"):
        run_recipe(load_recipe(recipe), tmp_path / "out", data_dir=empty, progress=False)


@pytest.mark.real
@pytest.mark.parametrize(
    "task, pair, n_dev",
    [("sst2", False, 872), ("cola", False, 1043), ("rte", True, 277), ("stsb", True, 1500)],
)
def test_real_glue_tasks_encode_and_score(data_dir, minilm_path, task, pair, n_dev):
    from sparse_nlp.evaluation.tasks import TASKS, encode_glue, evaluate_glue, load_for_task

    model, tokenizer = load_for_task(minilm_path, task)
    features = encode_glue(tokenizer, task, "dev", data_dir=data_dir, max_length=64)
    assert len(features) == n_dev
    assert (max(f["token_type_ids"][-2] for f in features) == 1) == pair  # sentence pairs get segment 1
    assert all(len(f["input_ids"]) <= 64 for f in features)
    result = evaluate_glue(model, tokenizer, task, data_dir=data_dir, max_length=64, limit=64, progress=False)
    metric = TASKS[task].main_metric
    assert result["num_examples"] == 64 and -100 <= result[metric] <= 100


def test_group_by_length_batches_rows_of_similar_length(tmp_path):
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
    )

    from sparse_nlp.recipes import TrainingSettings, _training_args

    folder = tiny_bert_folder(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": [1] * int(n), "attention_mask": [1] * int(n), "labels": 0}
        for n in torch.randint(2, 60, (512,), generator=generator)
    ]

    def padded_tokens(group: bool) -> int:
        args = _training_args(TrainingSettings(batch_size=16, group_by_length=group), tmp_path, 0, False)
        loader = Trainer(
            model=model, args=args, train_dataset=rows, data_collator=DataCollatorWithPadding(tokenizer)
        ).get_train_dataloader()
        batches = list(loader)
        assert sum(len(b["labels"]) for b in batches) == len(rows)  # every row once either way
        return sum(b["input_ids"].numel() for b in batches)

    real = sum(len(r["input_ids"]) for r in rows)
    grouped, shuffled = padded_tokens(True), padded_tokens(False)
    assert grouped < 0.8 * shuffled and grouped < 1.25 * real


def test_group_by_length_must_be_a_bool(tmp_path):
    text = TINY.format(model="m")
    bad = text.replace("logging_steps: 100}", "logging_steps: 100, group_by_length: often}", 1)
    assert bad != text
    with pytest.raises(ConfigError, match=r"stages\[0\]\.training\.group_by_length must be true or false"):
        load_recipe(_write(tmp_path, bad))


RECOVER = """
model: {model}
task: sst2
max_length: 32
stages:
  - name: recover
    type: prune
    teacher: {teacher}
    sparsity: {{weights: [{{method: magnitude, sparsity: 0.8, targets: [all-linear]}}]}}
    schedule: {{initial_sparsity: 0.8, start_step: 0, end_step: 0, update_every: 1}}
    distillation: {{temperature: 2.0, alpha: 0.5}}
    training: {{max_steps: 6, learning_rate: 1e-3, batch_size: 8, logging_steps: 100}}
"""


def test_teacher_folder_and_a_recovery_stage_keep_the_mask(tmp_path, monkeypatch, tiny_run):
    """A stage can name a model folder as its teacher (a value with '/'), e.g. to train a pruned model on at
    its sparsity with the dense model as the teacher; the pruned weights stay exactly the same ones."""
    data_dir, first = tiny_run.data_dir, tiny_run.out  # the TINY recipe's dense and gmp models
    recipe = load_recipe(_write(tmp_path, RECOVER.format(model="m", teacher=first / "dense")))
    assert recipe.stages[0].teacher == str(first / "dense")
    teachers = []
    original_init = Distiller.__init__

    def spy(self, student, teacher, config):
        teachers.append(teacher)
        original_init(self, student, teacher, config)

    monkeypatch.setattr(Distiller, "__init__", spy)
    again = run_recipe(
        recipe, tmp_path / "again", data_dir=data_dir, start_from=first / "gmp", progress=False
    )
    assert again["stages"][0]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    (teacher,) = teachers  # the folder's model, not the student's starting point
    dense = from_pretrained(first / "dense").state_dict()
    assert all(torch.equal(t, dense[n]) for n, t in teacher.state_dict().items())
    before, after = from_pretrained(first / "gmp"), from_pretrained(tmp_path / "again" / "recover")
    changed = 0
    for (name, p), (_, q) in zip(before.named_parameters(), after.named_parameters(), strict=True):
        if "encoder" in name and name.endswith("weight") and p.dim() == 2:
            assert torch.equal(p == 0, q == 0), name  # same zeros
            changed += int(not torch.equal(p, q))
    assert changed > 0  # and the kept weights did train


@pytest.mark.parametrize("where", ["nowhere", "folder-without-model"])
def test_missing_teacher_folder_fails_before_training(tmp_path, capsys, where):
    model_dir = tiny_bert_folder(tmp_path / "model")
    data_dir = tiny_glue_dir(tmp_path / "data")
    (tmp_path / "folder-without-model").mkdir()
    # a finetune stage first: the bad teacher of the later stage must fail before it trains
    recover = RECOVER.format(model="m", teacher=tmp_path / where).split("stages:\n")[1]
    recipe = _write(tmp_path, TINY.format(model=model_dir).split("  - name: gmp")[0] + recover)
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--data-dir", str(data_dir), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "stages[1].teacher" in err and where in err and "config.json" in err
    assert not out.exists()
