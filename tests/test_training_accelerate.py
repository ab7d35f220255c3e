"""The plain accelerate loop: 2 processes (CPU, gloo) and 1 process end with the same masks; a run stopped
at a checkpoint and resumed ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("accelerate_prune_script.py")


def _launch(out: Path, processes: int, *extra: str) -> dict:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # on a CPU-only machine `--num_processes 2` alone starts ONE process (accelerate's simple launcher);
    # `--multi_gpu` goes through torchrun, and without CUDA accelerate picks gloo (DistributedType.MULTI_CPU)
    launcher = ["--multi_gpu"] if processes > 1 else ["--cpu"]
    cmd = [
        accelerate,
        "launch",
        *launcher,
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(SCRIPT),
        str(out),
        *extra,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted one-process run, launched once for both tests: (its folder, its result)."""
    out = tmp_path_factory.mktemp("accelerate") / "one"
    return out, _launch(out, 1)


def _masks(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "masks.safetensors"))


@pytest.mark.slow
def test_two_processes_and_one_process_end_with_same_masks(tmp_path, one_process):
    one_dir, one = one_process
    two = _launch(tmp_path / "two", 2)
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    assert one["steps"] == two["steps"] == 8 and one["applied_step"] == two["applied_step"] == 6
    a, b = _masks(one_dir), _masks(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 12
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all((1 - a[k].float().mean()).item() == pytest.approx(0.75, abs=0.01) for k in a)
    wa, wb = (
        load_file(str(one_dir / "weights.safetensors")),
        load_file(str(tmp_path / "two" / "weights.safetensors")),
    )
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


@pytest.mark.slow
def test_accelerate_resume_matches_uninterrupted_run(tmp_path, one_process):
    full_dir, full = one_process
    _launch(tmp_path / "part", 1, "--stop-after", "4", "--save-every", "4")
    resumed = _launch(tmp_path / "part", 1, "--resume")
    assert resumed["steps"] == full["steps"] and resumed["applied_step"] == full["applied_step"]
    a, b = _masks(full_dir), _masks(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)
    wa, wb = (
        load_file(str(full_dir / "weights.safetensors")),
        load_file(str(tmp_path / "part" / "weights.safetensors")),
    )
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
