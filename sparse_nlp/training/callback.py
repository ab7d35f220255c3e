"""Trainer callbacks: gradual weight pruning (`SparsityCallback`) and gradual structured removal
(`StructuredCallback`) inside the stock ``transformers.Trainer``.

    pruner = GradualPruner(model, SparsityConfig.magnitude(0.8), CubicSchedule(end_step=600, update_every=50))
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      callbacks=[SparsityCallback(pruner)],
                      compute_loss_func=Distiller(model, teacher, DistillationConfig()))  # optional
    trainer.train()                      # or trainer.train(resume_from_checkpoint=True)

No Trainer subclass: the callback updates the masks after optimizer steps, writes the pruning state into
every Trainer checkpoint folder and reads it back when training resumes from one. `StructuredCallback`
runs a `StructuredPruner` the same way (removals after optimizer steps, the Trainer's optimizer following
the replaced layers), so heads/FFN removal with distillation uses the same Trainer path as weight pruning.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..config import ConfigError
from .pruner import STATE_FILE, GradualPruner
from .structured import StructuredPruner, endless_batches

logger = logging.getLogger(__name__)


class SparsityCallback(TrainerCallback):
    """Runs a `GradualPruner` during ``Trainer.train``.

    Args:
        pruner: Built on the model before the Trainer (so movement scores exist before training starts).
        finish_at_end: Drop movement scores and hooks when training ends (masks stay on the model).
    """

    def __init__(self, pruner: GradualPruner, finish_at_end: bool = True) -> None:
        self.pruner = pruner
        self.finish_at_end = finish_at_end

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.global_step > 0:  # resumed: the Trainer has loaded checkpoint-<global_step>
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not (folder / STATE_FILE).is_file():
                raise FileNotFoundError(
                    f"resuming at step {state.global_step} but {folder / STATE_FILE} is missing; "
                    "the checkpoint was not written with SparsityCallback."
                )
            self.pruner.load(folder)
            logger.info(
                "resumed pruning state from %s (last update at step %s)", folder, self.pruner.applied_step
            )
        self.pruner.step(state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.pruner.after_optimizer_step(state.global_step)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero:
            self.pruner.save(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.finish_at_end:
            self.pruner.finish()


class StructuredCallback(TrainerCallback):
    """Runs a `StructuredPruner` during ``Trainer.train``: removals at the scheduled optimizer steps.

    Data-based scores (``taylor``, ``movement``) read batches of the Trainer's training data, drawn in an
    order of their own (seeded with ``args.seed``) so the training order is the same as without removal.
    One process only: the layers change shape during training, which distributed data parallel cannot
    follow. A run cannot resume from a Trainer checkpoint written mid-removal (train the stage again).

    Args:
        pruner: Built on the model before the Trainer.
    """

    def __init__(self, pruner: StructuredPruner) -> None:
        self.pruner = pruner

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if args.world_size > 1:
            raise ConfigError(
                f"structured removal runs on one process (the layers change shape while training); "
                f"this run has {args.world_size}."
            )
        if state.global_step > 0 and not self.pruner.done:
            raise ConfigError(
                f"resuming at step {state.global_step} inside a structured removal schedule is not supported; "
                "train the stage from its start."
            )
        loader = kwargs.get("train_dataloader")
        if self.pruner.score_data is None and loader is not None:
            self.pruner.score_data = endless_batches(
                loader.dataset, args.per_device_train_batch_size, loader.collate_fn, args.seed
            )
        self.pruner.step(state.global_step, kwargs.get("optimizer"))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.pruner.step(state.global_step, kwargs.get("optimizer"))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not self.pruner.done:
            logger.warning(
                "training ended at step %d before the last structured removal (step %d): %d of %d stages ran.",
                state.global_step,
                self.pruner.schedule.last_step,
                self.pruner.completed,
                self.pruner.schedule.stages,
            )
