"""Structured removal during training: `StructuredPruner`, `StructuredCallback` in the stock Trainer, the
``structured`` recipe stage (removal + distillation, exact save/reload) and its validation errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

from sparse_nlp import from_pretrained
from sparse_nlp.config import ConfigError, StructuredSparsity
from sparse_nlp.recipes import load_recipe, run_recipe
from sparse_nlp.structured import apply_structured, model_layout, remove_units
from sparse_nlp.structured.recovery import RecoveryConfig, gradual_structured_prune
from sparse_nlp.training import StructuredCallback, StructuredPruner, StructuredSchedule
from sparse_nlp.training.distillation import Distiller
from sparse_nlp.training.structured import cubic_fraction, swap_parameters
from tests.conftest import labelled_batches, tiny_inputs, tiny_model

from .tiny_glue import tiny_bert_folder, tiny_glue_dir


def _units(model):
    return [(x.num_heads, x.num_kv_heads, x.ffn) for x in model_layout(model)]


def _rows(n: int = 32, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (n, 10), generator=g)
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(10, dtype=torch.long), "labels": i % 2}
        for i in range(n)
    ]


def _collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.stack([r["input_ids"] for r in rows]),
        "attention_mask": torch.stack([r["attention_mask"] for r in rows]),
        "labels": torch.tensor([r["labels"] for r in rows]),
    }


def _args(tmp_path, max_steps: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
    )


def test_first_removal_at_step_zero_matches_one_shot_removal():
    """One stage at step 0 with weight-norm scores removes exactly the units `apply_structured` removes."""
    target = StructuredSparsity(heads=0.5, ffn=0.25, score="weight-norm", scope="per-layer")
    one_shot, staged = tiny_model("bert"), tiny_model("bert")
    apply_structured(one_shot, target, progress=False)
    pruner = StructuredPruner(staged, target, StructuredSchedule(stages=1))
    assert pruner.step(0) and not pruner.step(5)  # idempotent once done
    assert _units(staged) == _units(one_shot)
    expect = one_shot.state_dict()
    assert all(torch.equal(t, expect[name]) for name, t in staged.state_dict().items())
    assert staged.config.sparse_nlp["structured"] == one_shot.config.sparse_nlp["structured"]


def test_swap_parameters_follows_replaced_layers(family):
    model = tiny_model(family)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs = tiny_inputs()
    labels = inputs["input_ids"] if model.config.model_type not in ("bert", "roberta", "distilbert") else None
    labels = labels if labels is not None else torch.tensor([0, 1])
    model(**inputs, labels=labels).loss.backward()
    optimizer.step()
    before = dict(model.named_parameters())
    untouched = {n: optimizer.state[p]["exp_avg"].clone() for n, p in before.items()}
    layout = model_layout(model)
    # all head units of block 1 (its attention module goes), one of block 0, half the FFN of block 0
    remove_units(model, {0: [0], 1: list(range(layout[1].head_units))}, {0: list(range(0, layout[0].ffn, 2))})
    changed = swap_parameters(optimizer, before, model)
    now = dict(model.named_parameters())
    in_groups = [p for g in optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in in_groups} == {id(p) for p in now.values()}
    assert changed == sum(1 for n, p in before.items() if now.get(n) is not p) > 0
    for name, p in now.items():
        if before[name] is p:  # untouched: its optimizer state carries on
            assert torch.equal(optimizer.state[p]["exp_avg"], untouched[name])
        else:
            assert p not in optimizer.state
    model.zero_grad()
    model(**inputs, labels=labels).loss.backward()
    optimizer.step()  # the shrunk parameters train


def test_callback_in_trainer_removes_on_schedule_and_matches_the_wrapper(tmp_path):
    target = StructuredSparsity(heads=0.5, ffn=0.5, score="taylor", scope="per-layer")
    schedule = StructuredSchedule(stages=3, steps_per_stage=2, score_batches=2)
    student = tiny_model("bert")
    teacher = copy.deepcopy(student)
    pruner = StructuredPruner(student, target, schedule)
    distiller = Distiller(student, teacher)
    calls = []
    original = Distiller.__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    Distiller.__call__ = counting
    try:
        trainer = Trainer(
            model=student,
            args=_args(tmp_path, 7),
            train_dataset=_rows(),
            data_collator=_collate,
            callbacks=[StructuredCallback(pruner)],
            compute_loss_func=distiller,
        )
        trainer.train()
    finally:
        Distiller.__call__ = original
    assert len(calls) == 7  # every step distilled
    events = [(e["step"], e["head_units"], e["ffn_units"]) for e in pruner.events]
    assert [e[0] for e in events] == [0, 2, 4]  # stage k at (k - 1) * steps_per_stage
    # per-layer scope: every block loses the scheduled share of its units, rounded per block
    shares = [0.5 * cubic_fraction(1, k, 3) for k in (1, 2, 3)]
    assert [e[1] for e in events] == [2 * (4 - int(4 * round(f * 8) / 8 + 0.5)) for f in shares]
    assert events[-1][1:] == (4, 64) and events[0][2] > events[1][2] > events[2][2]
    assert pruner.done and pruner.summary()["head_units"] == 4 and pruner.summary()["ffn_units"] == 64
    # the Trainer's optimizer trains exactly the model's current parameters
    optimizer = trainer.optimizer
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in student.parameters() if p.requires_grad
    }
    # the thin wrapper over the same path ends at the same shapes
    other = tiny_model("bert")

    batches = labelled_batches

    cfg = RecoveryConfig(stages=3, steps_per_stage=2, final_steps=1, score_batches=2)
    log = gradual_structured_prune(other, copy.deepcopy(other), batches(), target, cfg)
    assert _units(other) == _units(student)
    assert [(e["step"], e["head_units"], e["ffn_units"]) for e in log if "stage" in e] == events


def test_data_score_without_data_names_the_fix():
    pruner = StructuredPruner(
        tiny_model("bert"), StructuredSparsity(heads=0.5, score="taylor"), StructuredSchedule(stages=1)
    )
    with pytest.raises(ConfigError, match="score_data"):
        pruner.step(0)


STRUCTURED = """
model: {model}
task: sst2
max_length: 32
stages:
  - name: h50-f50
    type: structured
    structured: {{heads: 0.5, ffn: 0.5, score: taylor, options: {{min_heads: 1}}}}
    removal: {{stages: 2, steps_per_stage: 2, score_batches: 2}}
    distillation: {{temperature: 2.0, alpha: 0.5}}
    training: {{max_steps: 6, learning_rate: 1e-3, batch_size: 8, logging_steps: 100}}
  - name: eval
    type: evaluate
"""


def test_structured_recipe_stage_removes_distils_saves_and_reloads_exactly(tmp_path, monkeypatch):
    import sparse_nlp.checkpoint as checkpoint

    model_dir = tiny_bert_folder(tmp_path / "model")
    data_dir = tiny_glue_dir(tmp_path / "data")
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(STRUCTURED.format(model=model_dir))
    recipe = load_recipe(recipe_path)
    assert recipe.stages[0].removal == StructuredSchedule(stages=2, steps_per_stage=2, score_batches=2)
    recipe.save(tmp_path / "again.yaml")
    assert load_recipe(tmp_path / "again.yaml") == recipe

    inputs = tiny_inputs(batch=3, length=9)
    saved = {}
    original_save = checkpoint.save_pretrained

    def spy_save(model, folder, **kwargs):
        with torch.no_grad():
            saved[Path(folder).name] = (model.eval()(**inputs).logits.clone(), _units(model))
        return original_save(model, folder, **kwargs)

    monkeypatch.setattr(checkpoint, "save_pretrained", spy_save)
    teachers = []
    original_init = Distiller.__init__

    def spy_init(self, student, teacher, config):
        teachers.append(teacher)
        original_init(self, student, teacher, config)

    monkeypatch.setattr(Distiller, "__init__", spy_init)
    results = run_recipe(recipe, tmp_path / "out", data_dir=data_dir, progress=False)

    stage = results["stages"][0]
    assert stage["steps"] == 6 and stage["removal_stages_done"] == 2
    assert (stage["head_units_before"], stage["ffn_units_before"]) == (8, 128)
    assert (stage["head_units"], stage["ffn_units"]) == (4, 64)
    assert all(lay.head_units >= 1 for lay in [*model_layout(from_pretrained(tmp_path / "out" / "h50-f50"))])
    (teacher,) = teachers  # the model as it was before the stage, unpruned
    assert _units(teacher) == [(4, 4, 64), (4, 4, 64)]
    assert results["stages"][1]["num_examples"] == 64
    # the checkpoint reloads with the removed shapes and gives exactly the saved model's logits
    logits, units = saved["h50-f50"]
    reloaded = from_pretrained(tmp_path / "out" / "h50-f50")
    assert _units(reloaded) == units and sum(u[1] for u in units) == 4 and sum(u[2] for u in units) == 64
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, logits)
    on_disk = json.loads((tmp_path / "out" / "h50-f50" / "config.json").read_text())
    assert [layer["ffn"] for layer in on_disk["sparse_nlp"]["structured"]["layers"]] == [u[2] for u in units]


@pytest.mark.parametrize(
    "old, new, message",
    [
        (
            "    removal: {stages: 2, steps_per_stage: 2, score_batches: 2}\n",
            "",
            r"stages\[0\]\.removal is required",
        ),
        ("steps_per_stage: 2,", "steps_per_stage: 6,", r"stages\[0\]\.removal: the last removal \(step 6"),
        (
            "logging_steps: 100}",
            "logging_steps: 100, save_steps: 2}",
            r"save_steps must be 0 in a structured",
        ),
        ("min_heads: 1", "min_head: 1", r"stages\[0\]\.structured\.options: unknown option"),
        ("score: taylor", "score: talyor", r"stages\[0\]\.structured\.score"),
        ("stages: 2,", "stages: 0,", r"removal\.stages must be an integer >= 1"),
        (
            "    removal:",
            "    schedule: {end_step: 2}\n    removal:",
            r"stages\[0\]\.schedule has no meaning in a structured stage",
        ),
    ],
)
def test_bad_structured_stage_names_the_key(tmp_path, old, new, message):
    text = STRUCTURED.format(model="m")
    assert old in text
    path = tmp_path / "recipe.yaml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError, match=message):
        load_recipe(path)
