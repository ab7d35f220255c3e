"""Which Trainer checkpoint a run can resume from, and keeping only complete ones.

A Trainer checkpoint folder ``checkpoint-<step>`` is *complete* when the Trainer finished writing it
(``trainer_state.json``, written last by the Trainer, parses; the model weights are there) and, for a
pruning stage, the pruning state written right after it by `SparsityCallback` (``sparse_pruner.json``)
parses too. A run killed while writing a checkpoint leaves an incomplete one; resuming skips it, says why,
and takes the newest complete one. `KeepNewestComplete` deletes older checkpoints only once a newer one
is complete, so a kill at any moment leaves at least one complete checkpoint (once one was written).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from transformers import TrainerCallback

from .pruner import STATE_FILE, TENSORS_FILE

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _step(folder: Path) -> int:
    try:
        return int(folder.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def checkpoint_problem(folder: Path, pruning: bool) -> str | None:
    """Why `folder` cannot be resumed from (None when it is complete)."""
    state = folder / TRAINER_STATE
    try:
        json.loads(state.read_text())
    except FileNotFoundError:
        return f"no {TRAINER_STATE} (the Trainer was stopped while writing it)"
    except (OSError, ValueError) as err:
        return f"{TRAINER_STATE} is unreadable ({type(err).__name__})"
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        return "no model weights"
    if pruning:
        try:
            json.loads((folder / STATE_FILE).read_text())
        except FileNotFoundError:
            return f"no pruning state {STATE_FILE} (stopped between the Trainer's save and the pruner's)"
        except (OSError, ValueError) as err:
            return f"pruning state {STATE_FILE} is unreadable ({type(err).__name__})"
        tensors = folder / TENSORS_FILE
        if tensors.exists():
            from safetensors import safe_open

            try:
                with safe_open(str(tensors), framework="pt"):
                    pass
            except Exception as err:  # noqa: BLE001  (safetensors raises several types for a damaged file)
                return f"pruning tensors {TENSORS_FILE} are unreadable ({type(err).__name__})"
    return None


def newest_complete(trainer_dir: Path, pruning: bool) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest complete ``checkpoint-*`` under `trainer_dir` or None, [(skipped newer folder, why)])."""
    folders = sorted(
        (p for p in Path(trainer_dir).glob("checkpoint-*") if p.is_dir() and _step(p) >= 0),
        key=_step,
        reverse=True,
    )
    skipped = []
    for folder in folders:
        problem = checkpoint_problem(folder, pruning)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


class KeepNewestComplete(TrainerCallback):
    """After each save: once the new checkpoint is complete, delete the older ones (the Trainer's own
    ``save_total_limit`` deletes them before the pruning state is written, which a kill can leave with
    nothing to resume from). Add it after `SparsityCallback`, so it runs after the pruning state is saved.
    """

    def __init__(self, pruning: bool) -> None:
        self.pruning = pruning

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        current = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint_problem(current, self.pruning) is not None:
            return
        for folder in Path(args.output_dir).glob("checkpoint-*"):
            if folder.is_dir() and 0 <= _step(folder) < state.global_step:
                shutil.rmtree(folder, ignore_errors=True)
