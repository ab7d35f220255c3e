"""Distillation losses: the sparse student learns from the dense teacher's logits (and hidden states)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError


@dataclass
class DistillationConfig:
    """How the task loss and the teacher's signal are mixed.

    Attributes:
        temperature: Softmax temperature of the logits KL (the KL is scaled by T^2, as in Hinton et al.).
        alpha: Weight of the distillation term; the task loss gets ``1 - alpha``.
        hidden_weight: Weight of the mean-squared error between hidden states (0 turns it off).
    """

    temperature: float = 2.0
    alpha: float = 0.5
    hidden_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"distillation temperature must be > 0, got {self.temperature!r}.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"distillation alpha must be in [0, 1], got {self.alpha!r}.")
        if self.hidden_weight < 0:
            raise ConfigError(f"distillation hidden_weight must be >= 0, got {self.hidden_weight!r}.")


def logits_kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, times T^2; MSE for 1-output regression."""
    if student.shape[-1] == 1:  # regression head (STS-B): match the teacher's score
        return F.mse_loss(student, teacher.detach())
    t = temperature
    return F.kl_div(
        F.log_softmax(student / t, dim=-1),
        F.log_softmax(teacher.detach() / t, dim=-1),
        log_target=True,
        reduction="batchmean",
    ) * (t * t)


def hidden_mse_loss(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over layers of the MSE between hidden states (padding positions left out)."""
    if len(student) != len(teacher):
        raise ValueError(
            f"student has {len(student)} hidden-state tensors, teacher {len(teacher)}; layers must match."
        )
    losses = []
    for s, t in zip(student, teacher):
        diff = (s - t.detach()).pow(2).mean(-1)  # (B, T)
        if attention_mask is not None:
            m = attention_mask.to(diff.dtype)
            losses.append((diff * m).sum() / m.sum().clamp(min=1))
        else:
            losses.append(diff.mean())
    return torch.stack(losses).mean()


def distillation_loss(
    task_loss: torch.Tensor,
    student_out,
    teacher_out,
    config: DistillationConfig,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(1 - alpha) * task + alpha * KD(logits) + hidden_weight * MSE(hidden states)``.

    `student_out` / `teacher_out` are transformers model outputs (``.logits``, and ``.hidden_states`` when
    `hidden_weight` > 0, which needs ``output_hidden_states=True``).
    """
    loss = (1 - config.alpha) * task_loss + config.alpha * logits_kd_loss(
        student_out.logits, teacher_out.logits, config.temperature
    )
    if config.hidden_weight > 0:
        if student_out.hidden_states is None or teacher_out.hidden_states is None:
            raise ValueError("hidden_weight > 0 needs output_hidden_states=True for student and teacher.")
        loss = loss + config.hidden_weight * hidden_mse_loss(
            student_out.hidden_states, teacher_out.hidden_states, attention_mask
        )
    return loss


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain task loss: mean squared error for a 1-output regression head, else cross-entropy."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


TEACHER_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")


class Distiller:
    """Distillation for the stock ``Trainer``: pass ``compute_loss_func=Distiller(student, teacher, cfg)``.

    ``compute_loss_func`` receives only the student's outputs and the labels, so the distiller keeps the
    inputs of the student's latest forward call (a forward pre-hook, which leaves ``forward`` untouched) and
    runs the frozen teacher on them. The same object is a plain callable for hand-written loops:
    ``loss = distiller(student(**inputs), labels)``.

    Args:
        student: The model being trained (unwrapped; the hook sits on it).
        teacher: The dense teacher (same tokenizer and label space). It is put in eval mode and frozen, and
            moved to the device of the student's inputs when they arrive elsewhere (a Trainer on a GPU).
        config: `DistillationConfig`.
    """

    def __init__(
        self, student: torch.nn.Module, teacher: torch.nn.Module, config: DistillationConfig | None = None
    ) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self._teacher_device = next(teacher.parameters()).device
        self.config = config or DistillationConfig()
        self._inputs: dict[str, torch.Tensor] = {}
        self._handle = student.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module, args, kwargs):
        self._inputs = {k: v for k, v in kwargs.items() if k in TEACHER_INPUTS and v is not None}
        if args:  # positional input_ids
            self._inputs["input_ids"] = args[0]
        if self.config.hidden_weight > 0:
            return args, {**kwargs, "output_hidden_states": True}
        return None

    def remove(self) -> None:
        """Remove the hook from the student."""
        self._handle.remove()

    def __call__(
        self, outputs, labels: torch.Tensor | None, num_items_in_batch: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self._inputs:
            raise RuntimeError(
                "Distiller saw no student forward call; build it on the model that is trained."
            )
        device = next(iter(self._inputs.values())).device
        if self._teacher_device != device:  # the Trainer moves the student, not the teacher it never sees
            self.teacher.to(device)
            self._teacher_device = device
        with torch.no_grad():
            teacher_out = self.teacher(**self._inputs, output_hidden_states=self.config.hidden_weight > 0)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        task = task_loss(logits, labels) if labels is not None else logits.new_zeros(())
        loss = distillation_loss(task, outputs, teacher_out, self.config, self._inputs.get("attention_mask"))
        if num_items_in_batch is not None and labels is not None:
            # the Trainer expects a loss normalised over the whole (accumulated, all-process) batch
            loss = loss * labels.shape[0] / num_items_in_batch
        return loss
