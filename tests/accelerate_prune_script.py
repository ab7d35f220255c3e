"""Run by tests/test_training_accelerate.py under ``accelerate launch``: a tiny BERT pruned by GMP with
distillation in the plain accelerate loop; the main process writes the final masks to OUT/masks.safetensors.

    accelerate launch --cpu --num_processes 2 tests/accelerate_prune_script.py OUT [--stop-at K] [--resume]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import transformers
from accelerate import Accelerator
from conftest import tiny_config  # this script's folder is on sys.path when it runs
from safetensors.torch import save_file

from sparse_nlp import SparsityConfig
from sparse_nlp.pruning.schedules import CubicSchedule
from sparse_nlp.training.accelerate_loop import LoopConfig, latest_checkpoint, train_loop
from sparse_nlp.training.distillation import DistillationConfig, Distiller
from sparse_nlp.training.pruner import GradualPruner


def tiny_bert(seed: int):
    torch.manual_seed(seed)
    config = tiny_config(
        "bert", max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    return transformers.BertForSequenceClassification(config)


def collate(features):
    return {
        "input_ids": torch.tensor([f["input_ids"] for f in features]),
        "labels": torch.tensor([f["labels"] for f in features]),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--stop-after", type=int, default=None)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(3, 128, (10,), generator=g).tolist(), "labels": i % 2} for i in range(64)
    ]
    model, teacher = tiny_bert(0), tiny_bert(1)
    pruner = GradualPruner(
        model, SparsityConfig.magnitude(0.75), CubicSchedule(start_step=1, end_step=6, update_every=1)
    )
    distiller = Distiller(model, teacher, DistillationConfig(alpha=0.5))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(cpu=True)
    cfg = LoopConfig(
        max_steps=8, batch_size=8, learning_rate=1e-3, output_dir=str(out), save_every=args.save_every
    )
    resume = latest_checkpoint(out) if args.resume else None
    result = train_loop(
        model,
        data,
        collate,
        pruner=pruner,
        distiller=distiller,
        config=cfg,
        accelerator=accelerator,
        resume_from=resume,
        stop_after=args.stop_after,
        progress=False,
    )
    if accelerator.is_main_process:
        masks = {n: m.to(torch.uint8).contiguous() for n, m in pruner.masks().items()}
        save_file(masks, str(out / "masks.safetensors"))
        weights = {n: p.detach().contiguous() for n, p in model.named_parameters()}
        save_file(weights, str(out / "weights.safetensors"))
        (out / "result.json").write_text(json.dumps({**result, "applied_step": pruner.applied_step}) + "\n")
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    sys.exit(main())
