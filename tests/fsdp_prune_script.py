"""Run by tests/test_training_fsdp.py under ``torchrun``: a tiny llama pruned by gradual magnitude pruning with
logits distillation, its parameters sharded by FSDP2 (``fully_shard``) when ``--fsdp`` is given; the main
process writes the final masks and the whole weights to OUT.

    torchrun --standalone --nproc_per_node 2 tests/fsdp_prune_script.py OUT --fsdp
    python tests/fsdp_prune_script.py OUT          # the same run on one process, unsharded

Every process takes its slice of each global batch of 8 windows, so 2 processes see the batches one process
sees; FSDP2 averages the gradients over processes as the one process averages the loss over its batch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from conftest import tiny_config  # this script's folder is on sys.path when it runs
from safetensors.torch import save_file

from sparse_nlp import SparsityConfig
from sparse_nlp.pruning.masking import is_sharded
from sparse_nlp.pruning.schedules import CubicSchedule
from sparse_nlp.training.distillation import DistillationConfig, Distiller
from sparse_nlp.training.pruner import GradualPruner

STEPS, BATCH = 6, 8


def tiny_llama(seed: int):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_config("llama"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--fsdp", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.fsdp:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if args.fsdp else (0, 1)
    data = torch.randint(3, 128, (STEPS * BATCH, 12), generator=torch.Generator().manual_seed(0))  # (N, T)
    model, teacher = tiny_llama(0), tiny_llama(1)
    pruner = GradualPruner(
        model, SparsityConfig.magnitude(0.5), CubicSchedule(start_step=1, end_step=4, update_every=1)
    )
    distiller = Distiller(model, teacher, DistillationConfig(alpha=0.5, temperature=2.0))
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    pruner.step(0)
    model.train()
    for step in range(1, STEPS + 1):
        batch = data[(step - 1) * BATCH : step * BATCH]  # (BATCH, T)
        mine = batch.chunk(world)[rank]  # (BATCH / world, T)
        loss = distiller(model(input_ids=mine), mine)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.after_optimizer_step(step)
    sharded = any(is_sharded(p) for p in model.parameters())
    weights = {
        n: (p.full_tensor() if is_sharded(p) else p).detach().contiguous()
        for n, p in model.named_parameters()
    }  # full_tensor is collective: every process gathers
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        save_file(
            {n: m.to(torch.uint8).contiguous() for n, m in pruner.masks().items()},
            str(out / "masks.safetensors"),
        )
        save_file(weights, str(out / "weights.safetensors"))
        result = {
            "world": world,
            "sharded": sharded,
            "applied_step": pruner.applied_step,
            "sparsity": pruner.sparsity(),
        }
        (out / "result.json").write_text(json.dumps(result) + "\n")
    if args.fsdp:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
