"""Gradual structured pruning with distillation from a stream of ready batches: a thin wrapper that runs the
stock ``transformers.Trainer`` with `sparse_nlp.training.StructuredCallback`.

The fraction removed after stage ``k`` of ``S`` follows a cubic schedule, ``F * (1 - (1 - k/S)^3)`` (Zhu &
Gupta, 2017): most units go early, while the model is still close to the teacher, and the last stages remove
few. Recipes reach the same path through a ``structured`` stage; this function serves scripts that already
hold an endless iterator of collated batches.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import IterableDataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..config import StructuredSparsity
from ..training.callback import StructuredCallback
from ..training.distillation import DistillationConfig, Distiller
from ..training.structured import StructuredPruner, StructuredSchedule, cubic_fraction

logger = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor]

__all__ = ["RecoveryConfig", "cubic_fraction", "gradual_structured_prune"]


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

    def schedule(self) -> StructuredSchedule:
        """The removal schedule: stage ``k`` at step ``(k - 1) * steps_per_stage``."""
        return StructuredSchedule(
            stages=self.stages, steps_per_stage=self.steps_per_stage, score_batches=self.score_batches
        )


class _Stream(IterableDataset):
    """Ready batches from an endless iterator, one per DataLoader item."""

    def __init__(self, batches: Iterator[Batch]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield next(self.batches)


def _unwrap(items: list[Batch]) -> dict[str, torch.Tensor]:
    (batch,) = items  # the DataLoader's batch of one ready batch
    return dict(batch)


class _LossLog(TrainerCallback):
    """Passes the Trainer's loss logs on as ``{"step", "loss", "lr"}``."""

    def __init__(self, emit: Callable[[dict], None]) -> None:
        self.emit = emit

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.emit({"step": state.global_step, "loss": logs["loss"], "lr": logs.get("learning_rate")})


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

    Runs ``transformers.Trainer`` (AdamW, linear warm-up and decay, gradient clipping at 1.0) with a
    `StructuredCallback`, and a `Distiller` when there is a teacher.

    Args:
        student: The model to prune (changed in place); its shapes are recorded in its metadata.
        teacher: The dense teacher (eval mode, no gradients), or None for the model's own loss only.
        batches: An endless iterator of labelled training batches (dicts of tensors with ``labels``); the
            score batches are drawn from it too.
        target: Final budgets (``heads``, ``ffn`` fractions of the ORIGINAL units), ``score`` and ``scope``.
        cfg: Schedule and optimizer settings.
        on_log: Called with a dict every `log_every` steps and after every removal.
        log_every: Steps between log calls.

    Returns:
        The log entries.
    """
    log: list[dict] = []

    def emit(entry: dict) -> None:
        log.append(entry)
        if on_log is not None:
            on_log(entry)

    pruner = StructuredPruner(student, target, cfg.schedule(), score_data=batches, on_event=emit)
    distiller = Distiller(student, teacher, cfg.distill) if teacher is not None else None
    device = next(student.parameters()).device
    with tempfile.TemporaryDirectory(prefix="sparse-nlp-structured-") as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=cfg.total_steps,
            learning_rate=cfg.lr,
            weight_decay=cfg.weight_decay,
            warmup_steps=cfg.warmup,
            lr_scheduler_type="linear",
            max_grad_norm=1.0,
            per_device_train_batch_size=1,
            logging_steps=log_every,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=0,
            use_cpu=device.type == "cpu",
        )
        trainer = Trainer(
            model=student,
            args=args,
            train_dataset=_Stream(batches),
            data_collator=_unwrap,
            callbacks=[StructuredCallback(pruner), _LossLog(emit)],
            compute_loss_func=distiller,
        )
        trainer.train()
    if distiller is not None:
        distiller.remove()
    student.eval()
    return log
