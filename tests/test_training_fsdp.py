"""Gradual pruning with distillation on parameters sharded by FSDP2 (``fully_shard``): 2 CPU processes (gloo)
end with the masks and weights of one unsharded process, the pruned weights exactly zero."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("fsdp_prune_script.py")


def _run(out: Path, processes: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    if processes == 1:
        cmd = [sys.executable, str(SCRIPT), str(out)]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
        cmd = [*launcher, str(processes), str(SCRIPT), str(out), "--fsdp"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
def test_fsdp2_sharded_pruning_matches_one_process(tmp_path):
    one, two = _run(tmp_path / "one", 1), _run(tmp_path / "two", 2)
    assert (one["world"], one["sharded"]) == (1, False) and (two["world"], two["sharded"]) == (2, True)
    assert one["applied_step"] == two["applied_step"] == 4
    assert one["sparsity"] == two["sparsity"] == pytest.approx(0.5)
    masks_one = load_file(str(tmp_path / "one" / "masks.safetensors"))
    masks_two = load_file(str(tmp_path / "two" / "masks.safetensors"))
    assert masks_one.keys() == masks_two.keys() and len(masks_one) == 14
    assert all(torch.equal(masks_one[k], masks_two[k]) for k in masks_one)
    weights_one = load_file(str(tmp_path / "one" / "weights.safetensors"))
    weights_two = load_file(str(tmp_path / "two" / "weights.safetensors"))
    for name, mask in masks_two.items():
        weight = weights_two[f"{name}.weight"]  # gathered from the shards
        assert torch.all(weight[mask == 0] == 0), (
            name
        )  # AdamW with weight decay kept the zeros on every shard
    assert all(torch.allclose(weights_one[k], weights_two[k], atol=1e-5) for k in weights_one)
