"""Distillation losses: the sparse student learns from the dense teacher's logits (and hidden states)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError

TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""The precisions a teacher may run in (`DistillationConfig.teacher_dtype`)."""


@dataclass
class DistillationConfig:
    """How the task loss and the teacher's signal are mixed.

    Attributes:
        temperature: Softmax temperature of the logits KL (the KL is scaled by T^2, as in Hinton et al.).
        alpha: Weight of the distillation term; the task loss gets ``1 - alpha``.
        hidden_weight: Weight of the mean-squared error between hidden states (0 turns it off).
        teacher_dtype: Precision the frozen teacher runs in: ``float32`` (default, exact) or ``bfloat16``
            (half the teacher's memory, a causal LM's largest extra cost; its logits are cast back to float32
            before the loss). On CPUs without native bf16 matrix units (AVX2) bf16 matmuls run slower.
    """

    temperature: float = 2.0
    alpha: float = 0.5
    hidden_weight: float = 0.0
    teacher_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"distillation temperature must be > 0, got {self.temperature!r}.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"distillation alpha must be in [0, 1], got {self.alpha!r}.")
        if self.hidden_weight < 0:
            raise ConfigError(f"distillation hidden_weight must be >= 0, got {self.hidden_weight!r}.")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ConfigError(
                f"distillation teacher_dtype must be one of {', '.join(TEACHER_DTYPES)}, got {self.teacher_dtype!r}."
            )


def logits_kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, times T^2; MSE for 1-output regression.

    Logits of one row each, (B, C), give the mean KL per row. Token logits, (B, T, V) (a causal LM), give the
    mean KL per token over the positions `token_mask` (B, T) keeps (all when None).
    """
    teacher = teacher.detach().to(
        student.dtype
    )  # a bf16 teacher's logits are compared in the student's precision
    if student.shape[-1] == 1:  # regression head (STS-B): match the teacher's score
        return F.mse_loss(student, teacher)
    if student.dim() == 3:  # (B, T, V): one distribution per token
        if token_mask is not None:
            keep = token_mask.bool()
            student, teacher = student[keep], teacher[keep]  # (N, V)
        else:
            student, teacher = student.flatten(0, 1), teacher.flatten(0, 1)  # (B * T, V)
        if student.shape[0] == 0:
            return student.sum() * 0.0
    t = temperature
    return F.kl_div(
        F.log_softmax(student / t, dim=-1),
        F.log_softmax(teacher / t, dim=-1),
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
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(1 - alpha) * task + alpha * KD(logits) + hidden_weight * MSE(hidden states)``.

    `student_out` / `teacher_out` are transformers model outputs (``.logits``, and ``.hidden_states`` when
    `hidden_weight` > 0, which needs ``output_hidden_states=True``). `token_mask` (B, T) picks the positions
    whose token logits are distilled (causal LM); `attention_mask` the positions of the hidden-state MSE.
    """
    loss = (1 - config.alpha) * task_loss + config.alpha * logits_kd_loss(
        student_out.logits, teacher_out.logits, config.temperature, token_mask
    )
    if config.hidden_weight > 0:
        if student_out.hidden_states is None or teacher_out.hidden_states is None:
            raise ValueError("hidden_weight > 0 needs output_hidden_states=True for student and teacher.")
        loss = loss + config.hidden_weight * hidden_mse_loss(
            student_out.hidden_states, teacher_out.hidden_states, attention_mask
        )
    return loss


IGNORE_INDEX = -100
"""Label of a position that no loss counts (the transformers convention)."""


def is_causal_lm_batch(logits: torch.Tensor, labels: torch.Tensor | None) -> bool:
    """Token logits (B, T, V) with token labels (B, T): a causal LM's next-token task."""
    return logits.dim() == 3 and labels is not None and labels.dim() == 2


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain task loss: mean squared error for a 1-output regression head, next-token cross-entropy for a
    causal LM (logits at position t predict the label at t + 1; ``-100`` labels are left out), else
    cross-entropy."""
    if is_causal_lm_batch(logits, labels):
        shifted = logits[:, :-1].flatten(0, 1).float()  # (B * (T - 1), V)
        return F.cross_entropy(shifted, labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
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
        teacher: The dense teacher (same tokenizer and label space). It is put in eval mode and frozen, cast
            to ``config.teacher_dtype``, and moved to the device of the student's inputs when they arrive
            elsewhere (a Trainer on a GPU).
        config: `DistillationConfig`.

    For a causal LM (token logits and token labels) the task loss is the next-token cross-entropy and the
    distillation term the mean KL per predicted token (the positions whose shifted label is not ``-100``).
    """

    def __init__(
        self, student: torch.nn.Module, teacher: torch.nn.Module, config: DistillationConfig | None = None
    ) -> None:
        self.config = config or DistillationConfig()
        self.teacher = teacher.eval().requires_grad_(False).to(TEACHER_DTYPES[self.config.teacher_dtype])
        self._teacher_device = next(teacher.parameters()).device
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
        attention_mask = self._inputs.get("attention_mask")
        token_mask = None
        items = None if labels is None else labels.shape[0]
        if is_causal_lm_batch(logits, labels):
            # distil the positions that predict a label, as the task loss does: (B, T), the last never predicts
            token_mask = torch.zeros_like(labels, dtype=torch.bool)
            token_mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
            items = int(token_mask.sum())
        loss = distillation_loss(task, outputs, teacher_out, self.config, attention_mask, token_mask)
        if num_items_in_batch is not None and items is not None:
            # the Trainer expects a loss normalised over the whole (accumulated, all-process) batch: rows for a
            # classifier, predicted tokens (shifted labels that are not -100) for a causal LM
            loss = loss * items / num_items_in_batch
        return loss
