"""A plain accelerate training loop that runs the same `GradualPruner` (and `Distiller`) as the Trainer callback.

It serves multi-process weight pruning without the ``transformers.Trainer`` (``accelerate launch`` of a
hand-written script); everything else (recipes, structured removal) runs through the Trainer and its
callbacks. After every optimizer step it calls `GradualPruner.after_optimizer_step`, the same pruning step
`SparsityCallback` runs, so the two paths cannot drift apart.

The same script runs on one process or under ``accelerate launch --num_processes N`` (CPU with gloo, or
GPUs) without changes. ``batch_size`` is the global batch: each of N processes gets ``batch_size / N``
consecutive examples of it, so N processes see exactly the batches one process sees. The data order is a
fixed permutation per epoch (seed + epoch), independent of the number of processes, which makes resuming and
comparing runs exact. Masks stay identical on every process: magnitude scores come from the (synchronised)
weights and movement score gradients are averaged across processes.

    pruner = GradualPruner(model, config, schedule)          # on the unwrapped model, before prepare
    result = train_loop(model, train_features, collate_fn, pruner=pruner, config=LoopConfig(max_steps=500))
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..errors import ConfigError
from .distillation import Distiller, task_loss
from .pruner import GradualPruner

logger = logging.getLogger(__name__)

LOOP_STATE = "loop_state.json"


@dataclass
class LoopConfig:
    """Settings of `train_loop`.

    Attributes:
        max_steps: Optimizer steps to run.
        batch_size: Global batch size (split evenly over processes).
        learning_rate: AdamW learning rate (linear decay to 0 after `warmup_steps`).
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps.
        seed: Seed of the data order and of torch.
        output_dir: Where checkpoints go (``checkpoint-<step>``); None = no checkpoints.
        save_every: Checkpoint every N steps (0 = never).
        log_every: Log the loss every N steps.
    """

    max_steps: int = 100
    batch_size: int = 32
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    seed: int = 42
    output_dir: str | None = None
    save_every: int = 0
    log_every: int = 50

    def validate(self) -> None:
        for name in ("max_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"loop.{name} must be >= 1, got {getattr(self, name)!r}.")
        if self.save_every and self.output_dir is None:
            raise ConfigError("loop.save_every needs loop.output_dir.")


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The ``checkpoint-<step>`` folder with the highest step in `output_dir`, or None."""
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if (p / LOOP_STATE).is_file()]
    return max(folders, key=lambda p: int(p.name.split("-")[1])) if folders else None


def train_loop(
    model: nn.Module,
    dataset: Any,
    collate_fn: Callable,
    *,
    pruner: GradualPruner | None = None,
    distiller: Distiller | None = None,
    config: LoopConfig | None = None,
    accelerator: Any = None,
    resume_from: str | Path | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train `model` with AdamW for ``config.max_steps`` steps, pruning with `pruner` after every step.

    Args:
        model: The model (unwrapped); `pruner` and `distiller` must be built on it.
        dataset: A sequence of features (dicts with ``labels``).
        collate_fn: Batches features (e.g. ``DataCollatorWithPadding``).
        pruner: Gradual magnitude / movement pruning state, or None for dense training.
        distiller: The loss (student outputs, labels) -> loss; None uses the task loss.
        config: `LoopConfig`.
        accelerator: An ``accelerate.Accelerator`` (default: a new one).
        resume_from: A ``checkpoint-<step>`` folder written by this loop.
        stop_after: Stop at this step although the schedule runs to ``max_steps`` (a job split in parts).
        progress: Show a progress bar (main process only).

    Returns:
        ``{"steps", "last_loss", "sparsity", "num_processes"}``.
    """
    from accelerate import Accelerator
    from transformers import get_linear_schedule_with_warmup

    config = config or LoopConfig()
    config.validate()
    accelerator = accelerator or Accelerator()
    world = accelerator.num_processes
    if config.batch_size % world:
        raise ConfigError(f"loop.batch_size {config.batch_size} does not split over {world} processes.")
    torch.manual_seed(config.seed)
    decay = [
        p
        for n, p in model.named_parameters()
        if p.requires_grad and not n.endswith("bias") and "LayerNorm" not in n
    ]
    no_decay = [
        p for n, p in model.named_parameters() if p.requires_grad and (n.endswith("bias") or "LayerNorm" in n)
    ]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, config.warmup_steps, config.max_steps)
    wrapped, optimizer = accelerator.prepare(model, optimizer)

    step = 0
    if resume_from is not None:
        resume_from = Path(resume_from)
        accelerator.load_state(str(resume_from))
        step = json.loads((resume_from / LOOP_STATE).read_text())["step"]
        for _ in range(step):
            scheduler.step()
        if pruner is not None:
            pruner.load(resume_from)
    if pruner is not None:
        pruner.step(step)

    per_process = config.batch_size // world
    steps_per_epoch = max(1, len(dataset) // config.batch_size)
    bar = tqdm(
        total=config.max_steps,
        initial=step,
        desc="train",
        disable=not progress or not accelerator.is_main_process,
    )
    wrapped.train()
    last_loss = math.nan
    while step < config.max_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        order = _epoch_order(len(dataset), config.seed, epoch)[: steps_per_epoch * config.batch_size]
        # batch b of the epoch = examples order[b*B:(b+1)*B]; process r takes its r-th slice of each batch
        mine = [
            i
            for b in range(offset, steps_per_epoch)
            for i in order[b * config.batch_size + accelerator.process_index * per_process :][:per_process]
        ]
        loader = DataLoader(
            Subset(dataset, mine), batch_size=per_process, shuffle=False, collate_fn=collate_fn
        )
        for batch in loader:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            labels = batch.pop("labels")
            outputs = wrapped(**batch)
            loss = distiller(outputs, labels) if distiller is not None else task_loss(outputs.logits, labels)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if pruner is not None:
                pruner.after_optimizer_step(step)
            last_loss = float(loss.detach())
            bar.update(1)
            if config.log_every and step % config.log_every == 0:
                logger.info("step %d loss %.4f", step, last_loss)
            if config.save_every and step % config.save_every == 0:
                save_checkpoint(
                    accelerator, Path(config.output_dir) / f"checkpoint-{step}", step, pruner, config
                )
            if step >= config.max_steps or (stop_after is not None and step >= stop_after):
                break
        if stop_after is not None and step >= stop_after:
            break
    bar.close()
    accelerator.wait_for_everyone()
    return {
        "steps": step,
        "last_loss": last_loss,
        "sparsity": pruner.sparsity() if pruner is not None else 0.0,
        "num_processes": world,
    }


def save_checkpoint(
    accelerator: Any, folder: Path, step: int, pruner: GradualPruner | None, config: LoopConfig
) -> None:
    """Model, optimizer and RNG state (accelerate), the pruning state and the step, in one folder."""
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        if pruner is not None:
            pruner.save(folder)
        (folder / LOOP_STATE).write_text(
            json.dumps({"step": step, "config": asdict(config)}, indent=2) + "\n"
        )
    accelerator.wait_for_everyone()
