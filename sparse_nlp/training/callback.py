"""`SparsityCallback`: gradual magnitude / movement pruning inside the stock ``transformers.Trainer``.

    pruner = GradualPruner(model, SparsityConfig.magnitude(0.8), CubicSchedule(end_step=600, update_every=50))
    trainer = Trainer(model=model, args=args, train_dataset=train,
                      callbacks=[SparsityCallback(pruner)],
                      compute_loss_func=Distiller(model, teacher, DistillationConfig()))  # optional
    trainer.train()                      # or trainer.train(resume_from_checkpoint=True)

No Trainer subclass: the callback updates the masks after optimizer steps, writes the pruning state into
every Trainer checkpoint folder and reads it back when training resumes from one.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .pruner import STATE_FILE, GradualPruner

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
        self.pruner.score_step()
        self.pruner.step(state.global_step)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero:
            self.pruner.save(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.finish_at_end:
            self.pruner.finish()
