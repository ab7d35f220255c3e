"""Where a recipe runs: ``--device auto|cpu|cuda[:N]`` is checked before any work, recorded in results.json,
and a run on a CUDA GPU (tests skipped without one) trains, prunes, distils and evaluates there."""

from __future__ import annotations

import json

import pytest
import torch

from sparse_nlp import from_pretrained
from sparse_nlp.cli import main
from sparse_nlp.config import ConfigError
from sparse_nlp.recipes import load_recipe, resolve_device, run_recipe

from .test_recipes import TINY, _write
from .tiny_glue import tiny_bert_folder, tiny_glue_dir

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MOVEMENT = TINY.replace("method: magnitude", "method: movement").replace(
    "targets: [all-linear]}", "targets: [all-linear], options: {{score_lr: 0.05}}}"
)


def test_auto_device_is_the_gpu_when_there_is_one():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("CPU") == torch.device("cpu")


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "mps0", ""])
def test_unknown_device_names_the_choices(bad):
    if bad == "":  # empty means the default
        assert resolve_device(bad) == resolve_device("auto")
        return
    with pytest.raises(ConfigError, match=r"device must be auto, cpu, cuda or cuda:N, got '" + bad):
        resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_says_so():
    with pytest.raises(ConfigError, match="no CUDA GPU.*--device cpu"):
        resolve_device("cuda")


@needs_cuda
def test_cuda_index_beyond_the_gpus_fails():
    with pytest.raises(ConfigError, match="numbered from 0"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_bad_device_fails_before_the_run_writes_anything(tmp_path, capsys):
    model_dir = tiny_bert_folder(tmp_path / "model")
    data_dir = tiny_glue_dir(tmp_path / "data")
    recipe = _write(tmp_path, TINY.format(model=model_dir))
    out = tmp_path / "out"
    argv = ["run", str(recipe), "--data-dir", str(data_dir), "--out", str(out), "--device", "gpu0"]
    assert main(argv) == 2
    assert "'gpu0'" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_recipe_runs_on_the_device_and_records_it(tmp_path, device):
    """Fine-tune, movement-prune with distillation from the fine-tuned teacher, evaluate: all on `device`.
    (Resuming on a GPU is tested with the Trainer callback in test_training.py.)"""
    model_dir = tiny_bert_folder(tmp_path / "model")
    data_dir = tiny_glue_dir(tmp_path / "data")
    recipe = load_recipe(_write(tmp_path, MOVEMENT.format(model=model_dir)))
    assert recipe.stages[1].sparsity.weights[0].method == "movement"
    results = run_recipe(recipe, tmp_path / "out", data_dir=data_dir, progress=False, device=device)
    assert results["device"].split()[0] == device
    stages = {s["name"]: s for s in results["stages"]}
    assert stages["gmp"]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert stages["eval"]["block_sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert 0 <= stages["eval"]["accuracy"] <= 100
    assert json.loads((tmp_path / "out" / "results.json").read_text())["device"] == results["device"]
    reloaded = from_pretrained(tmp_path / "out" / "gmp")  # saved from the device, restored on the CPU
    assert next(reloaded.parameters()).device.type == "cpu"
