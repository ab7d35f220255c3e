"""Gradual structured pruning with distillation: remove units in stages while the student learns from the teacher.

A plain loop (no Trainer) so that the optimizer can be rebuilt after every removal, which replaces the
pruned layers' parameters. The fraction removed after stage ``k`` of ``S`` follows a cubic schedule,
``F * (1 - (1 - k/S)^3)`` (Zhu & Gupta, 2017): most units go early, while the model is still close to the
teacher, and the last stages remove few.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import StructuredSparsity
from ..training.distillation import DistillationConfig, distillation_loss
from .removal import model_layout, remove_units
from .scores import accumulate_gradient_scores, select_units, weight_norm_scores
from .shapes import record_shapes

logger = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor]


@dataclass
class RecoveryConfig:
    """Schedule and optimizer of gradual structured pruning.

    Attributes:
        stages: Removal stages (1 = one-shot removal, then training).
        steps_per_stage: Training steps after each removal.
        final_steps: Extra training steps after the last removal.
        lr: Peak AdamW learning rate (linear warm-up, then linear decay to 0 over all steps).
        weight_decay: AdamW weight decay.
        warmup: Fraction of all steps used for warm-up.
        score_batches: Labelled batches used for each Taylor scoring.
        distill: Distillation mix (logits KL, optional hidden-state MSE).
    """

    stages: int = 3
    steps_per_stage: int = 100
    final_steps: int = 200
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.06
    score_batches: int = 8
    distill: DistillationConfig = field(default_factory=DistillationConfig)

    @property
    def total_steps(self) -> int:
        return self.stages * self.steps_per_stage + self.final_steps


def cubic_fraction(target: float, stage: int, stages: int) -> float:
    """Cumulative fraction removed after `stage` (1-based) of `stages`."""
    return target * (1.0 - (1.0 - stage / stages) ** 3)


def _lr_factor(step: int, total: int, warmup: float) -> float:
    warm = max(1, int(total * warmup))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


def _optimizer(model: nn.Module, cfg: RecoveryConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "norm" in name.lower() else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )


def _units(model: nn.Module) -> tuple[int, int]:
    layouts = model_layout(model)
    return sum(lay.head_units for lay in layouts), sum(lay.ffn for lay in layouts)


def gradual_structured_prune(
    student: nn.Module,
    teacher: nn.Module | None,
    batches: Iterator[Batch],
    target: StructuredSparsity,
    cfg: RecoveryConfig,
    *,
    on_log: Callable[[dict], None] | None = None,
    log_every: int = 50,
) -> list[dict]:
    """Prune `student` to `target` in `cfg.stages` stages, training with distillation from `teacher` in between.

    Args:
        student: The model to prune (changed in place); its shapes are recorded in its metadata at the end.
        teacher: The dense teacher (eval mode, no gradients), or None for task loss only.
        batches: An endless iterator of labelled training batches (dicts of tensors with ``labels``).
        target: Final budgets (``heads``, ``ffn`` fractions of the ORIGINAL units), ``score`` (``taylor`` or
            ``weight-norm``) and ``scope``.
        cfg: Schedule and optimizer settings.
        on_log: Called with a dict every `log_every` steps and after every removal.
        log_every: Steps between log calls.

    Returns:
        The log entries.
    """
    opts = target.options
    normalize = opts.get("normalize", True)
    heads0, ffn0 = _units(student)
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    log: list[dict] = []
    step = 0
    total = cfg.total_steps

    def emit(entry: dict) -> None:
        log.append(entry)
        if on_log is not None:
            on_log(entry)

    for stage in range(1, cfg.stages + 1):
        frac = cubic_fraction(1.0, stage, cfg.stages)
        want_heads = math.floor(target.heads * frac * heads0 + 0.5)
        want_ffn = math.floor(target.ffn * frac * ffn0 + 0.5)
        heads_now, ffn_now = _units(student)
        if target.score == "weight-norm":
            scores = weight_norm_scores(student)
        else:
            score_set = [next(batches) for _ in range(cfg.score_batches)]
            scores = accumulate_gradient_scores(student, score_set, absolute=target.score != "movement")
        drop_heads = select_units(
            scores.heads,
            (want_heads - (heads0 - heads_now)) / heads_now if heads_now else 0.0,
            target.scope,
            min_keep=opts.get("min_heads", 0),
            normalize=normalize,
        )
        drop_ffn = select_units(
            scores.ffn,
            (want_ffn - (ffn0 - ffn_now)) / ffn_now if ffn_now else 0.0,
            target.scope,
            min_keep=opts.get("min_ffn", 0),
            normalize=normalize,
        )
        remove_units(student, drop_heads, drop_ffn)
        heads_now, ffn_now = _units(student)
        emit({"step": step, "stage": stage, "head_units": heads_now, "ffn_units": ffn_now})
        steps = cfg.steps_per_stage + (cfg.final_steps if stage == cfg.stages else 0)
        optimizer = _optimizer(student, cfg)
        student.train()
        for _ in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * _lr_factor(step, total, cfg.warmup)
            batch = next(batches)
            out = student(**batch, output_hidden_states=cfg.distill.hidden_weight > 0)
            if teacher is not None:
                with torch.no_grad():
                    t_out = teacher(**batch, output_hidden_states=cfg.distill.hidden_weight > 0)
                loss = distillation_loss(out.loss, out, t_out, cfg.distill, batch.get("attention_mask"))
            else:
                loss = out.loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            step += 1
            if step % log_every == 0:
                emit({"step": step, "loss": float(loss.detach()), "lr": optimizer.param_groups[0]["lr"]})
        student.eval()
    record_shapes(student, target)
    return log
