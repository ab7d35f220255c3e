"""Structured checkpoints: save -> sparse_nlp.from_pretrained is bit-identical; plain transformers loads only
what it can express (uniform FFN width) and fails loudly otherwise (checked in a subprocess without sparse_nlp)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sparse_nlp.checkpoint import CheckpointError, from_pretrained, save_pretrained
from sparse_nlp.config import SparsityConfig, StructuredSparsity
from sparse_nlp.sparsify import sparsify
from sparse_nlp.structured import StructuredError, apply_structured, model_layout, remove_units
from sparse_nlp.structured.shapes import rebuild_shapes
from tests.conftest import DECODERS, tiny_inputs, tiny_model


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _pruned(family):
    model = tiny_model(family)
    units = model_layout(model)[0].head_units
    remove_units(model, {0: [0], 1: list(range(units))}, {0: [1, 2, 3], 1: [5]})
    apply_structured(model, StructuredSparsity(heads=0.0, ffn=0.0), progress=False)  # records the shapes
    return model


def test_round_trip_bit_identical(family, tmp_path):
    model = _pruned(family)
    inputs = tiny_inputs()
    save_pretrained(model, tmp_path / "ckpt")
    loaded = from_pretrained(tmp_path / "ckpt")
    assert [vars(x) for x in model_layout(loaded)] == [vars(x) for x in model_layout(model)]
    assert torch.equal(_logits(loaded, inputs), _logits(model, inputs))
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)


def test_round_trip_with_weight_masks(tmp_path):
    model = tiny_model("bert")
    config = SparsityConfig(
        structured=StructuredSparsity(heads=0.25, ffn=0.3, score="weight-norm", scope="per-layer"),
        weights=SparsityConfig.magnitude(0.5, targets="ffn").weights,
    )
    sparsify(model, config, progress=False)
    save_pretrained(model, tmp_path / "ckpt")
    loaded = from_pretrained(tmp_path / "ckpt")
    inputs = tiny_inputs()
    assert torch.equal(_logits(loaded, inputs), _logits(model, inputs))
    down = loaded.bert.encoder.layer[0].output.dense
    assert down.weight_mask.shape == down.weight.shape
    assert torch.equal(down.weight_mask, model.bert.encoder.layer[0].output.dense.weight_mask)


def test_damaged_record_and_weights_raise(tmp_path):
    model = _pruned("bert")
    save_pretrained(model, tmp_path / "ckpt")
    cfg_file = tmp_path / "ckpt" / "config.json"
    data = json.loads(cfg_file.read_text())
    data["sparse_nlp"]["structured"]["layers"][0]["ffn"] = 50  # disagrees with the stored weights
    cfg_file.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="structured shapes"):
        from_pretrained(tmp_path / "ckpt")
    with pytest.raises(StructuredError, match="layers"):
        rebuild_shapes(tiny_model("bert"), {"layers": [{"heads": 1}]})
    with pytest.raises(StructuredError, match="records 1 layers"):
        rebuild_shapes(tiny_model("bert"), {"layers": [{"heads": 1, "kv_heads": 1, "ffn": 3}]})


PLAIN_LOAD = textwrap.dedent(
    """
    import sys, torch, transformers
    for arg in sys.argv[1:]:
        path, kind = arg.split("::")
        cls = transformers.AutoModelForCausalLM if kind == "causal" else transformers.AutoModelForSequenceClassification
        try:
            model = cls.from_pretrained(path)
        except Exception as err:
            print("RAISED", type(err).__name__)
        else:
            ids = torch.tensor([[5, 6, 7, 8, 9]])
            with torch.no_grad():
                print("LOADED", repr(model(input_ids=ids).logits.flatten().tolist()))
    assert "sparse_nlp" not in sys.modules
    """
)


def test_plain_transformers_loads_only_what_it_can_express(tmp_path):
    """Per-layer shapes or removed heads: plain transformers raises; a uniform FFN width: it loads the same model."""
    cases = {}
    for family in ("bert", "gpt2", "llama"):
        cases[f"{family}-per-layer"] = _pruned(family)
        heads = tiny_model(family)
        apply_structured(
            heads, StructuredSparsity(heads=0.5, score="weight-norm", scope="per-layer"), progress=False
        )
        cases[f"{family}-heads"] = heads
        uniform = tiny_model(family)
        apply_structured(
            uniform, StructuredSparsity(ffn=0.5, score="weight-norm", scope="per-layer"), progress=False
        )
        cases[f"{family}-uniform-ffn"] = uniform
    args = []
    for name, model in cases.items():
        save_pretrained(model, tmp_path / name)
        args.append(f"{tmp_path / name}::{'causal' if name.split('-')[0] in DECODERS else 'cls'}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith(("RAISED", "LOADED"))]
    assert len(lines) == len(cases)
    for (name, model), line in zip(cases.items(), lines):
        if name.endswith("uniform-ffn"):
            assert line.startswith("LOADED"), name
            with torch.no_grad():
                expect = model(input_ids=torch.tensor([[5, 6, 7, 8, 9]])).logits.flatten().tolist()
            assert eval(line[len("LOADED ") :]) == expect, name  # noqa: S307  (our subprocess's repr of floats)
        else:
            assert line == "RAISED RuntimeError", name
