"""Training-aware sparsity: cubic schedule, gradual magnitude and movement pruning, distillation, the
Trainer callback (including resume) - all on tiny random models, a few steps each."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from sparse_nlp import SparsityConfig, WeightSparsity, sparsify
from sparse_nlp.config import ConfigError
from sparse_nlp.pruning.masking import get_mask
from sparse_nlp.pruning.schedules import CubicSchedule, ScheduleError
from sparse_nlp.training.callback import SparsityCallback
from sparse_nlp.training.distillation import DistillationConfig, Distiller, distillation_loss, task_loss
from sparse_nlp.training.pruner import GradualPruner

from .conftest import VOCAB, tiny_inputs, tiny_model

# ---- schedule ------------------------------------------------------------------------------------------


def test_cubic_schedule_values():
    s = CubicSchedule(initial_sparsity=0.0, final_sparsity=0.8, start_step=10, end_step=50, update_every=10)
    assert s.sparsity_at(0) == 0.0 and s.last_update(9) is None
    assert s.sparsity_at(10) == pytest.approx(0.0)
    assert s.sparsity_at(30) == pytest.approx(0.8 - 0.8 * 0.5**3)  # halfway: s_f + (s_i - s_f)(1 - 1/2)^3
    assert s.sparsity_at(50) == pytest.approx(0.8)
    assert s.sparsity_at(1000) == pytest.approx(0.8)
    values = [s.sparsity_at(t) for t in range(0, 60)]
    assert values == sorted(values)  # never decreases
    assert s.sparsity_at(31) == s.sparsity_at(39) == s.sparsity_at(30)  # constant between updates
    assert [t for t in range(70) if s.is_update_step(t)] == [10, 20, 30, 40, 50]
    assert not s.frozen(50) and s.frozen(51)


def test_cubic_schedule_end_not_on_grid_and_rule_sparsity():
    s = CubicSchedule(start_step=0, end_step=25, update_every=10)
    assert [t for t in range(40) if s.is_update_step(t)] == [0, 10, 20, 25]
    assert s.sparsity_at(25, final=0.6) == pytest.approx(0.6)
    with pytest.raises(ScheduleError, match="final_sparsity"):
        s.sparsity_at(25)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"final_sparsity": 1.2}, "final_sparsity"),
        ({"end_step": 5, "start_step": 10}, "end_step"),
        ({"update_every": 0}, "update_every"),
        ({"initial_sparsity": 0.5, "final_sparsity": 0.3}, "final_sparsity"),
        ({"start_step": 1.5}, "start_step"),
    ],
)
def test_cubic_schedule_validation_names_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        CubicSchedule(**kwargs)


# ---- gradual pruner ------------------------------------------------------------------------------------


def _adam_steps(model, pruner, steps, start=0):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    inputs = tiny_inputs()
    for step in range(start + 1, start + steps + 1):
        out = model(**inputs)
        logits = out.logits
        logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        pruner.score_step()
        pruner.step(step)


def test_gmp_reaches_target_per_layer_and_keeps_zeros(family):
    model = tiny_model(family).train()
    schedule = CubicSchedule(start_step=0, end_step=4, update_every=2)
    pruner = GradualPruner(model, SparsityConfig.magnitude(0.75), schedule)
    assert pruner.step(0) and pruner.sparsity() == pytest.approx(0.0)
    _adam_steps(model, pruner, 6)
    assert pruner.applied_step == 4
    for plan in pruner.plans:
        mask = get_mask(plan.module)
        weight = plan.module.weight
        assert (~mask).sum().item() == int(0.75 * mask.numel() + 0.5)  # exact budget per layer
        assert torch.all(weight[~mask] == 0)  # AdamW with weight decay kept the zeros


def test_masks_frozen_after_end_step():
    model = tiny_model("bert").train()
    pruner = GradualPruner(model, SparsityConfig.magnitude(0.5), CubicSchedule(end_step=3, update_every=1))
    pruner.step(0)
    _adam_steps(model, pruner, 3)
    frozen = pruner.masks()
    _adam_steps(model, pruner, 5, start=3)
    assert pruner.applied_step == 3
    assert all(torch.equal(frozen[n], m) for n, m in pruner.masks().items())


def test_gmp_nm_and_global_patterns():
    model = tiny_model("llama").train()
    rules = [
        WeightSparsity(method="magnitude", sparsity=0.5, pattern="2:4", targets=["ffn"]),
        WeightSparsity(method="magnitude", sparsity=0.6, scope="global", targets=["attention"]),
    ]
    pruner = GradualPruner(model, rules, CubicSchedule(end_step=2, update_every=1))
    pruner.step(0)
    _adam_steps(model, pruner, 2)
    masks = pruner.masks()
    ffn = [m for n, m in masks.items() if "mlp" in n]
    attn = [m for n, m in masks.items() if "self_attn" in n]
    assert all(torch.all(m.reshape(m.shape[0], -1, 4).sum(-1) == 2) for m in ffn)
    pruned = sum(int((~m).sum()) for m in attn)
    total = sum(m.numel() for m in attn)
    assert pruned == int(0.6 * total + 0.5)


def test_gradual_pruner_rejects_bad_input():
    model = tiny_model("bert")
    with pytest.raises(ConfigError, match="weights is empty"):
        GradualPruner(model, SparsityConfig(), CubicSchedule())
    with pytest.raises(ConfigError, match="method"):
        GradualPruner(model, [WeightSparsity(method="magnitud", sparsity=0.5)], CubicSchedule())


# ---- movement ------------------------------------------------------------------------------------------


def test_movement_hard_learns_scores_and_reaches_sparsity(family):
    model = tiny_model(family).train()
    rule = WeightSparsity(method="movement", sparsity=0.7, options={"score_lr": 0.05})
    pruner = GradualPruner(model, [rule], CubicSchedule(end_step=4, update_every=2))
    before = {n: s.detach().clone() for n, s in pruner.scores.items()}
    pruner.step(0)
    _adam_steps(model, pruner, 4)  # the last update (step 4) uses the latest scores
    assert any(not torch.equal(before[n], s) for n, s in pruner.scores.items())  # scores are learned
    for plan in pruner.plans:
        mask = get_mask(plan.module)
        assert (~mask).sum().item() == int(0.7 * mask.numel() + 0.5)
    # the masks follow the learned scores: every kept score beats every pruned one (per layer)
    name, score = next(iter(pruner.scores.items()))
    mask = pruner.masks()[name]
    assert score[mask].min() >= score[~mask].max()
    pruner.finish()
    assert not pruner.scores and get_mask(pruner.plans[0].module) is not None


def test_movement_soft_with_l1_prunes_by_threshold():
    model = tiny_model("bert").train()
    opts = {
        "variant": "soft",
        "l1": 50.0,
        "score_lr": 0.5,
        "init": "constant",
        "init_value": 0.2,
        "threshold": 0.5,
    }
    pruner = GradualPruner(
        model,
        [WeightSparsity(method="movement", sparsity=0.5, options=opts)],
        CubicSchedule(end_step=6, update_every=1),
    )
    pruner.step(0)
    assert pruner.sparsity() == 0.0  # sigmoid(0.2) > 0.5 everywhere
    _adam_steps(model, pruner, 6)
    assert 0.0 < pruner.sparsity() <= 1.0  # the L1 penalty pushed scores below the threshold
    for name, score in pruner.scores.items():
        assert torch.equal(pruner.masks()[name], torch.sigmoid(score.detach()) > 0.5)


def test_movement_is_refused_by_one_shot_sparsify():
    with pytest.raises(ConfigError, match="GradualPruner"):
        sparsify(
            tiny_model("bert"),
            SparsityConfig(weights=[WeightSparsity(method="movement", sparsity=0.5)]),
            progress=False,
        )
    with pytest.raises(ConfigError, match="variant"):
        GradualPruner(
            tiny_model("bert"),
            [WeightSparsity(method="movement", options={"variant": "medium"})],
            CubicSchedule(),
        )


# ---- distillation --------------------------------------------------------------------------------------


def test_distiller_matches_distillation_loss_and_hidden_states():
    student, teacher = tiny_model("bert").train(), tiny_model("bert", seed=3)
    cfg = DistillationConfig(temperature=2.0, alpha=0.6, hidden_weight=0.5)
    distiller = Distiller(student, teacher, cfg)
    inputs = tiny_inputs()
    labels = torch.tensor([0, 1])
    out = student(**inputs)
    assert out.hidden_states is not None  # the distiller asked for them
    loss = distiller(out, labels)
    with torch.no_grad():
        t_out = teacher(**inputs, output_hidden_states=True)
    expected = distillation_loss(task_loss(out.logits, labels), out, t_out, cfg, inputs["attention_mask"])
    assert torch.allclose(loss, expected)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    distiller.remove()
    assert student(**inputs).hidden_states is None


def test_distillation_config_validation():
    with pytest.raises(ConfigError, match="alpha"):
        DistillationConfig(alpha=1.5)


# ---- Trainer callback and resume -----------------------------------------------------------------------


def _features(n=64, seed=0, lengths=(10,)):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(3, VOCAB, (lengths[i % len(lengths)],), generator=g).tolist(),
            "labels": int(i % 2),
        }
        for i in range(n)
    ]


def _pad_collate(features):
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), width, dtype=torch.long)
    mask = torch.zeros(len(features), width, dtype=torch.long)
    for i, f in enumerate(features):
        ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, : len(f["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([f["labels"] for f in features])}


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _trainer_run(
    out, *, max_steps=10, stop_at=None, resume=False, method="magnitude", group_by_length=False, device="cpu"
):
    model = tiny_model("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    teacher = tiny_model("bert", seed=5)
    rule = WeightSparsity(
        method=method, sparsity=0.8, options={"score_lr": 0.05} if method == "movement" else {}
    )
    pruner = GradualPruner(model, [rule], CubicSchedule(start_step=2, end_step=8, update_every=2))
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=4,
        report_to=[],
        use_cpu=device == "cpu",  # on a GPU the Trainer moves the student after the pruner and teacher exist
        disable_tqdm=True,
        logging_steps=100,
        seed=7,
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
    )
    callbacks = [SparsityCallback(pruner, finish_at_end=False)] + ([_StopAt(stop_at)] if stop_at else [])
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_features(lengths=(4, 9, 13, 6, 16, 10, 7, 12) if group_by_length else (10,)),
        data_collator=_pad_collate if group_by_length else None,
        callbacks=callbacks,
        compute_loss_func=Distiller(model, teacher, DistillationConfig(alpha=0.5)),
    )
    trainer.train(resume_from_checkpoint=resume or None)
    return trainer, pruner


CUDA = pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("method", ["magnitude", "movement"])
def test_trainer_callback_and_resume_give_same_masks(tmp_path, method, device):
    trainer, full = _trainer_run(tmp_path / "full", method=method, device=device)
    assert trainer.state.global_step == 10 and full.applied_step == 8
    assert full.sparsity() == pytest.approx(0.8, abs=1e-3)
    assert (tmp_path / "full" / "checkpoint-4" / "sparse_pruner.json").is_file()
    assert all(m.device.type == device for m in full.masks().values())

    _, stopped = _trainer_run(tmp_path / "part", stop_at=4, method=method, device=device)
    assert stopped.applied_step == 4 and stopped.sparsity() < 0.8
    trainer2, resumed = _trainer_run(tmp_path / "part", resume=True, method=method, device=device)
    assert trainer2.state.global_step == 10
    assert resumed.applied_step == full.applied_step
    a, b = full.masks(), resumed.masks()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    for (n, p), (_, q) in zip(trainer.model.named_parameters(), trainer2.model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-5), n


def test_resume_with_length_grouped_batches_gives_same_masks(tmp_path):
    """Recipes may batch rows of similar length (group_by_length): a resumed run must still see the same
    batches, in the same order, as an uninterrupted one (the sampler draws from torch's global RNG)."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    trainer, full = _trainer_run(tmp_path / "full", group_by_length=True)
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)
    _trainer_run(tmp_path / "part", stop_at=4, group_by_length=True)
    trainer2, resumed = _trainer_run(tmp_path / "part", resume=True, group_by_length=True)
    a, b = full.masks(), resumed.masks()
    assert all(torch.equal(a[n], b[n]) for n in a)
    for (n, p), (_, q) in zip(trainer.model.named_parameters(), trainer2.model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-5), n


def test_resume_without_pruning_state_fails_clearly(tmp_path):
    _trainer_run(tmp_path / "run", stop_at=4)
    (tmp_path / "run" / "checkpoint-4" / "sparse_pruner.json").unlink()
    with pytest.raises(FileNotFoundError, match="sparse_pruner.json"):
        _trainer_run(tmp_path / "run", resume=True)
