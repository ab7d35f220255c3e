"""Sparsity schedules for pruning during training (pure functions of the step, no model state).

The cubic schedule of Zhu & Gupta (2017, "To prune, or not to prune") raises the sparsity fast while the
network can still recover and slowly near the end::

    s(t) = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3      for t0 <= t <= t1

Masks change only at update steps ``t0, t0 + f, t0 + 2f, ...`` and at ``t1``; after ``t1`` they are frozen
(the schedule stays at ``s_f`` and no step is an update step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ScheduleError


@dataclass
class CubicSchedule:
    """When and how fast gradual pruning raises the sparsity.

    Attributes:
        initial_sparsity: Sparsity at ``start_step`` (usually 0, or the sparsity the model already has).
        final_sparsity: Sparsity reached at ``end_step``; ``None`` means "the sparsity of each pruning rule".
        start_step: First optimizer step at which masks are computed (0 = before the first step).
        end_step: Last step at which masks change; from then on they are frozen.
        update_every: Steps between two mask updates.
    """

    initial_sparsity: float = field(default=0.0, metadata={"help": "Sparsity at start_step."})
    final_sparsity: float | None = field(
        default=None, metadata={"help": "Sparsity at end_step (None: each rule's sparsity)."}
    )
    start_step: int = field(default=0, metadata={"help": "First step that updates the masks."})
    end_step: int = field(default=1000, metadata={"help": "Last step that updates the masks; frozen after."})
    update_every: int = field(default=100, metadata={"help": "Steps between mask updates."})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, path: str = "schedule") -> None:
        for name in ("initial_sparsity", "final_sparsity"):
            value = getattr(self, name)
            if value is None and name == "final_sparsity":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
                raise ScheduleError(f"{path}.{name} must be a number in [0, 1), got {value!r}.")
        for name in ("start_step", "end_step", "update_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ScheduleError(f"{path}.{name} must be an integer >= 0, got {value!r}.")
        if self.update_every < 1:
            raise ScheduleError(f"{path}.update_every must be >= 1, got {self.update_every!r}.")
        if self.end_step < self.start_step:
            raise ScheduleError(
                f"{path}.end_step ({self.end_step}) is before start_step ({self.start_step})."
            )
        if self.final_sparsity is not None and self.final_sparsity < self.initial_sparsity:
            raise ScheduleError(
                f"{path}.final_sparsity ({self.final_sparsity}) is below initial_sparsity ({self.initial_sparsity})."
            )

    def last_update(self, step: int) -> int | None:
        """The latest update step ``<= step`` (``end_step`` once past it), or None before ``start_step``."""
        if step < self.start_step:
            return None
        if step >= self.end_step:
            return self.end_step
        return self.start_step + (step - self.start_step) // self.update_every * self.update_every

    def is_update_step(self, step: int) -> bool:
        """True at the steps where masks change: start, every `update_every` steps after, and the end step."""
        return self.start_step <= step <= self.end_step and self.last_update(step) == step

    def frozen(self, step: int) -> bool:
        """True once the masks can no longer change (strictly after ``end_step``)."""
        return step > self.end_step

    def sparsity_at(self, step: int, final: float | None = None) -> float:
        """Target sparsity in force at `step` (piecewise constant between update steps).

        Args:
            step: Optimizer step (``TrainerState.global_step``).
            final: The rule's sparsity, used when ``final_sparsity`` is None.
        """
        s_f = self.final_sparsity if self.final_sparsity is not None else final
        if s_f is None:
            raise ScheduleError("schedule.final_sparsity is None and no rule sparsity was given.")
        s_i = min(self.initial_sparsity, s_f)
        t = self.last_update(step)
        if t is None:
            return 0.0  # no mask before the first update step
        span = self.end_step - self.start_step
        progress = 1.0 if span == 0 else (t - self.start_step) / span
        return s_f + (s_i - s_f) * (1.0 - progress) ** 3
