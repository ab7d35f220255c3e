"""`StructuredPruner`: gradual removal of attention heads and FFN neurons during training.

The state shared by `StructuredCallback` (the stock ``transformers.Trainer``) and any hand-written loop. It
removes units in ``stages`` steps: stage ``k`` (1-based) runs at optimizer step
``start_step + (k - 1) * steps_per_stage`` and brings the removed fraction of the ORIGINAL units to
``target * (1 - (1 - k / stages) ** 3)`` (the cubic schedule of Zhu & Gupta, 2017: most units go early,
while the model is still close to its teacher; the last stages remove few).

Removal replaces the pruned layers' parameters by smaller ones (`sparse_nlp.structured.removal`), so
`step` also swaps them in the optimizer's parameter groups (their optimizer state starts afresh; the
state of untouched parameters and the learning-rate schedule carry on). The shape record in the model's
metadata is updated after every removal, so a model saved at any point reloads with
`sparse_nlp.from_pretrained`.

Scores come from the structured score registry (``weight-norm``, ``taylor``, ``movement``, or any
registered one): data-based scores read ``score_batches`` batches drawn from `score_data` at each removal.

    pruner = StructuredPruner(model, StructuredSparsity(heads=0.5, ffn=0.5, score="taylor"),
                              StructuredSchedule(stages=3, steps_per_stage=100))
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      callbacks=[StructuredCallback(pruner)],
                      compute_loss_func=Distiller(model, teacher, DistillationConfig()))  # optional
    trainer.train()
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from ..config import ConfigError, StructuredSparsity
from ..registry import STRUCTURED_SCORES
from ..structured import OPTION_DEFAULTS
from ..structured.removal import model_layout, remove_units
from ..structured.scores import ScoreContext, select_units
from ..structured.shapes import record_shapes

logger = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor]


def cubic_fraction(target: float, stage: int, stages: int) -> float:
    """Cumulative fraction removed after `stage` (1-based) of `stages`: ``target * (1 - (1 - stage/stages)^3)``."""
    return target * (1.0 - (1.0 - stage / stages) ** 3)


@dataclass
class StructuredSchedule:
    """When gradual structured removal happens.

    Attributes:
        stages: Number of removals (1 = remove everything at ``start_step``, then train).
        steps_per_stage: Optimizer steps between two removals.
        start_step: Optimizer step of the first removal (0 = before the first step).
        score_batches: Training batches read by a data-based score (``taylor``, ``movement``) at each removal.
    """

    stages: int = field(default=3, metadata={"help": "Number of removals."})
    steps_per_stage: int = field(default=100, metadata={"help": "Optimizer steps between two removals."})
    start_step: int = field(default=0, metadata={"help": "Step of the first removal (0 = before training)."})
    score_batches: int = field(
        default=8, metadata={"help": "Training batches a data-based score reads at each removal."}
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, path: str = "removal") -> None:
        """Check the fields; raises `ConfigError` naming the bad one."""
        for name, low in (("stages", 1), ("steps_per_stage", 1), ("start_step", 0), ("score_batches", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{path}.{name} must be an integer >= {low}, got {value!r}.")

    def removal_step(self, stage: int) -> int:
        """Optimizer step at which `stage` (1-based) removes its units."""
        return self.start_step + (stage - 1) * self.steps_per_stage

    @property
    def last_step(self) -> int:
        """Step of the last removal."""
        return self.removal_step(self.stages)


def _units(model: nn.Module) -> tuple[int, int]:
    """(head units, FFN neurons) of the whole model."""
    layouts = model_layout(model)
    return sum(lay.head_units for lay in layouts), sum(lay.ffn for lay in layouts)


def swap_parameters(optimizer: Any, before: dict[str, nn.Parameter], model: nn.Module) -> int:
    """Point `optimizer`'s parameter groups at `model`'s current parameters after layers were replaced.

    A parameter is matched by its name in `before` (``dict(model.named_parameters())`` taken before the
    change). Replaced parameters lose their optimizer state (their shape changed); parameters that no
    longer exist (a removed attention module) leave the groups. Works on a torch optimizer or a wrapper with
    ``.optimizer`` (accelerate's ``AcceleratedOptimizer``).

    Returns:
        The number of parameters replaced or dropped.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    now = dict(model.named_parameters())
    by_id = {id(p): now.get(name) for name, p in before.items()}
    changed = 0
    for group in inner.param_groups:
        params = []
        for p in group["params"]:
            new = by_id.get(id(p), p)
            if new is not p:
                inner.state.pop(p, None)
                changed += 1
            if new is not None:
                params.append(new)
        group["params"] = params
    return changed


class _Draw:
    """The score batches of one removal: drawn from the stream only when a score function reads them."""

    def __init__(self, stream: Iterator[Batch] | None, count: int, device: torch.device, score: str) -> None:
        self.stream, self.count, self.device, self.score = stream, count, device, score

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.stream is None:
            raise ConfigError(
                f"structured score {self.score!r} reads training batches: give StructuredPruner(score_data=...) "
                "or train through StructuredCallback (it draws them from the Trainer's training data)."
            )
        for _ in range(self.count):
            yield {k: v.to(self.device) for k, v in next(self.stream).items()}


class StructuredPruner:
    """Removes heads and FFN neurons of a model in stages while it trains.

    Args:
        model: A transformers model of a family in `sparse_nlp.targets.TARGETS` (changed in place).
        target: Final budgets (``heads``, ``ffn``: fractions of the units the model has NOW), ``score``,
            ``scope`` and the options ``normalize``, ``min_heads``, ``min_ffn``.
        schedule: When the removals happen.
        score_data: An endless iterator of labelled training batches for data-based scores (the callback
            supplies one from the Trainer's data when this is None).
        on_event: Called with ``{"step", "stage", "head_units", "ffn_units"}`` after every removal.
    """

    def __init__(
        self,
        model: nn.Module,
        target: StructuredSparsity,
        schedule: StructuredSchedule,
        *,
        score_data: Iterator[Batch] | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        target.validate("structured")
        unknown = sorted(set(target.options) - set(OPTION_DEFAULTS))
        if unknown:
            raise ConfigError(
                f"structured.options: unknown option(s) {unknown}; known: {', '.join(OPTION_DEFAULTS)}."
            )
        schedule.validate()
        self.model = model
        self.target = target
        self.schedule = schedule
        self.score_data = score_data
        self.on_event = on_event
        self.options = {**OPTION_DEFAULTS, **target.options}
        self.units0 = _units(model)  # (head units, FFN neurons) before any removal
        self.completed = 0  # stages done
        self.events: list[dict[str, Any]] = []

    @property
    def done(self) -> bool:
        """True once every stage has removed its units."""
        return self.completed == self.schedule.stages

    def step(self, global_step: int, optimizer: Any = None) -> bool:
        """Run the removals due at `global_step` (idempotent); returns True when units were removed.

        Args:
            global_step: Optimizer steps taken so far.
            optimizer: The optimizer training the model; its parameter groups follow the replaced layers.
        """
        removed = False
        while not self.done and global_step >= self.schedule.removal_step(self.completed + 1):
            self._remove(self.completed + 1, global_step, optimizer)
            removed = True
        return removed

    def plan(self, stage: int, scores: Any) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
        """Units `stage` removes given `scores`, so that the removed share of the ORIGINAL units follows the
        cubic schedule: (heads, ffn), each block index -> unit indices to remove."""
        frac = cubic_fraction(1.0, stage, self.schedule.stages)
        heads0, ffn0 = self.units0
        heads_now, ffn_now = _units(self.model)
        want_heads = math.floor(self.target.heads * frac * heads0 + 0.5)
        want_ffn = math.floor(self.target.ffn * frac * ffn0 + 0.5)
        opts = self.options
        heads = select_units(
            scores.heads,
            (want_heads - (heads0 - heads_now)) / heads_now if heads_now else 0.0,
            self.target.scope,
            min_keep=opts["min_heads"],
            normalize=opts["normalize"],
        )
        ffn = select_units(
            scores.ffn,
            (want_ffn - (ffn0 - ffn_now)) / ffn_now if ffn_now else 0.0,
            self.target.scope,
            min_keep=opts["min_ffn"],
            normalize=opts["normalize"],
        )
        return heads, ffn

    def _remove(self, stage: int, global_step: int, optimizer: Any) -> None:
        device = next(self.model.parameters()).device
        count = self.schedule.score_batches
        ctx = ScoreContext(
            data=_Draw(self.score_data, count, device, self.target.score), num_batches=count, progress=False
        )
        scores = STRUCTURED_SCORES.get(self.target.score)(self.model, ctx)
        heads, ffn = self.plan(stage, scores)
        before = dict(self.model.named_parameters())
        remove_units(self.model, heads, ffn)
        if optimizer is not None:
            swap_parameters(optimizer, before, self.model)
        record_shapes(self.model, self.target)
        self.completed = stage
        head_units, ffn_units = _units(self.model)
        event = {"step": global_step, "stage": stage, "head_units": head_units, "ffn_units": ffn_units}
        self.events.append(event)
        logger.info(
            "structured stage %d/%d at step %d: %d head units, %d FFN neurons left",
            stage,
            self.schedule.stages,
            global_step,
            head_units,
            ffn_units,
        )
        if self.on_event is not None:
            self.on_event(event)

    def summary(self) -> dict[str, Any]:
        """Unit counts before and now, and the stages done (what a recipe run records)."""
        heads_now, ffn_now = _units(self.model)
        return {
            "head_units": heads_now,
            "ffn_units": ffn_now,
            "head_units_before": self.units0[0],
            "ffn_units_before": self.units0[1],
            "removal_stages_done": self.completed,
        }


def endless_batches(
    dataset: Any, batch_size: int, collate_fn: Callable, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of `dataset` in a fresh seeded order per pass, forever (score batches beside the training order)."""
    shuffle = not isinstance(dataset, IterableDataset)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate_fn
    )
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the training data is empty; structured scores have no batches to read.")
