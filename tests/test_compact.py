"""The compact checkpoint format: exact round trip, smaller files, and loud failure without sparse_nlp."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from sparse_nlp import SparsityConfig, WeightSparsity, from_pretrained, save_pretrained, sparsify
from sparse_nlp.compact import (
    ATTN_MARKER,
    COMPACT_FILE,
    HEADER_KEY,
    decode_bitmask,
    decode_nm,
    encode_bitmask,
    encode_nm,
    encode_tensor,
    nm_axis,
)
from sparse_nlp.pruning.masking import get_mask, masked_modules

from .conftest import tiny_inputs, tiny_model


def _sparse(family: str, pattern: str = "unstructured", sparsity: float = 0.9, dtype=None):
    model = tiny_model(family)
    if dtype is not None:
        model.to(dtype)
    rule = WeightSparsity(method="magnitude", sparsity=sparsity, pattern=pattern, targets=["all-linear"])
    sparsify(model, SparsityConfig(weights=[rule]), progress=False)
    return model


def _encodings(folder) -> dict[str, str]:
    with safe_open(str(folder / COMPACT_FILE), framework="pt") as f:
        header = json.loads(f.metadata()[HEADER_KEY])
    return {k: e["encoding"] for k, e in header["tensors"].items()}


# ---- pure encoders ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bitmask_round_trip_is_exact_with_kept_zeros(dtype):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(7, 13, generator=g).to(dtype)
    mask = torch.rand(7, 13, generator=g) > 0.8
    weight = weight * mask
    weight[tuple(mask.nonzero()[0].tolist())] = 0.0  # a kept weight that is exactly zero must stay "kept"
    parts = encode_bitmask(weight, mask)
    assert parts["values"].numel() == int(mask.sum())
    w2, m2 = decode_bitmask(parts["mask"], parts["values"], tuple(weight.shape))
    assert torch.equal(m2, mask) and torch.equal(w2, weight) and w2.dtype == dtype


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 8)])
@pytest.mark.parametrize("transposed", [False, True])
def test_nm_round_trip_is_exact(n, m, transposed):
    g = torch.Generator().manual_seed(1)
    rows, cols = 6, 4 * m
    scores = torch.rand(rows, cols // m, m, generator=g)
    keep = (
        torch.zeros_like(scores, dtype=torch.bool)
        .scatter_(-1, scores.topk(n, -1).indices, True)
        .reshape(rows, cols)
    )
    weight = torch.randn(rows, cols, generator=g) * keep
    if transposed:  # GPT-2 Conv1D stores (in, out): the groups run along axis 0
        weight, keep = weight.t().contiguous(), keep.t().contiguous()
    axis = nm_axis(keep, n, m)
    assert axis == (0 if transposed else -1)
    parts = encode_nm(weight, keep, n, m, axis)
    bits = max(1, (m - 1).bit_length())
    assert parts["idx"].numel() == (rows * cols // m * n * bits + 7) // 8
    w2, m2 = decode_nm(parts["values"], parts["idx"], tuple(weight.shape), n, m, axis)
    assert torch.equal(m2, keep) and torch.equal(w2, weight)


def test_encoder_picks_dense_when_sparse_forms_do_not_help_or_would_lose_values():
    weight = torch.randn(8, 8)
    mask = torch.ones(8, 8, dtype=torch.bool)
    assert (
        encode_tensor(weight, mask)[0]["encoding"] == "dense"
    )  # nothing pruned: the bitmask only adds bytes
    mask[0, 0] = False  # weight[0, 0] is nonzero but masked: storing sparsely would drop it
    assert encode_tensor(weight, mask)[0]["encoding"] == "dense"


# ---- folders -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern,sparsity,encoding", [("unstructured", 0.9, "bitmask"), ("2:4", 0.5, "nm")])
def test_compact_round_trip_is_bit_exact(family, pattern, sparsity, encoding, tmp_path):
    model = _sparse(family, pattern, sparsity)
    inputs = tiny_inputs()
    with torch.no_grad():
        ref = model(**inputs).logits
    save_pretrained(model, tmp_path / "dense")
    save_pretrained(model, tmp_path / "compact", compact=True)
    assert not (tmp_path / "compact" / "model.safetensors").exists()
    used = set(_encodings(tmp_path / "compact").values())
    assert encoding in used
    dense_size = (tmp_path / "dense" / "model.safetensors").stat().st_size
    assert (tmp_path / "compact" / COMPACT_FILE).stat().st_size < dense_size
    loaded = from_pretrained(tmp_path / "compact")
    with torch.no_grad():
        out = loaded(**inputs).logits
    assert torch.equal(ref, out)
    a, b = dict(model.state_dict()), dict(loaded.state_dict())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    names = [n for n, _ in masked_modules(model)]
    assert names and names == [n for n, _ in masked_modules(loaded)]
    for name in names:
        assert torch.equal(get_mask(model.get_submodule(name)), get_mask(loaded.get_submodule(name)))
    meta = loaded.config.sparse_nlp
    assert "compact" not in meta and "files" not in meta  # facts of the folder, not of the model
    assert loaded.config._attn_implementation != ATTN_MARKER


def test_compact_fp16_nm_keeps_dtype_and_values(tmp_path):
    model = _sparse("llama", "2:4", 0.5, dtype=torch.float16)
    save_pretrained(model, tmp_path, compact=True)
    loaded = from_pretrained(tmp_path, dtype=torch.float16)
    a, b = dict(model.state_dict()), dict(loaded.state_dict())
    assert all(b[k].dtype == torch.float16 and torch.equal(a[k], b[k]) for k in a)


def test_kept_zero_weight_stays_in_mask(tmp_path):
    model = _sparse("bert")
    name, module = next(iter(masked_modules(model)))
    kept = get_mask(module).nonzero()[0].tolist()
    with torch.no_grad():
        module.weight[tuple(kept)] = 0.0
    save_pretrained(model, tmp_path, compact=True)
    loaded = from_pretrained(tmp_path)
    assert bool(get_mask(loaded.get_submodule(name))[tuple(kept)])


def test_switching_formats_in_one_folder_leaves_no_stale_weights(tmp_path):
    model = _sparse("bert")
    save_pretrained(model, tmp_path)
    save_pretrained(model, tmp_path, compact=True)
    assert not (tmp_path / "model.safetensors").exists() and (tmp_path / COMPACT_FILE).exists()
    save_pretrained(model, tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / COMPACT_FILE).exists()
    assert json.loads((tmp_path / "config.json").read_text()).get("attn_implementation") != ATTN_MARKER
    from_pretrained(tmp_path)


def test_compact_needs_a_sparse_model(tmp_path):
    from sparse_nlp import CheckpointError

    with pytest.raises(CheckpointError, match="sparse_nlp"):
        save_pretrained(tiny_model("bert"), tmp_path / "x", compact=True)
    assert not (tmp_path / "x").exists()


_PLAIN_LOAD = textwrap.dedent(
    """
    import sys
    import transformers
    loads = {
        "AutoModel": lambda: transformers.AutoModel.from_pretrained(sys.argv[1]),
        "AutoModelForSequenceClassification": lambda: transformers.AutoModelForSequenceClassification.from_pretrained(sys.argv[1]),
        "BertModel": lambda: transformers.BertModel.from_pretrained(sys.argv[1]),
        "BertModel-eager": lambda: transformers.BertModel.from_pretrained(sys.argv[1], attn_implementation="eager"),
    }
    for name, load in loads.items():
        try:
            load()
        except Exception as err:  # what plain transformers says
            print("REFUSED", name, type(err).__name__, str(err)[:300].replace("\\n", " "))
        else:
            print("LOADED", name)
    assert "sparse_nlp" not in sys.modules
    """
)


def test_plain_transformers_refuses_compact_checkpoint_naming_sparse_nlp(tmp_path):
    model = _sparse("bert")
    save_pretrained(model, tmp_path / "compact", compact=True)
    save_pretrained(model, tmp_path / "dense")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONSAFEPATH"] = "1"  # the script's folder and cwd are not on sys.path either
    outs = {}
    for kind in ("compact", "dense"):
        proc = subprocess.run(
            [sys.executable, "-c", _PLAIN_LOAD, str(tmp_path / kind)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs[kind] = proc.stdout.splitlines()
    assert len(outs["compact"]) == 4
    assert all(line.startswith("REFUSED") and "sparse_nlp" in line for line in outs["compact"]), outs[
        "compact"
    ]
    assert all(line.startswith("LOADED") for line in outs["dense"]), outs["dense"]  # the default stays plain


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_compact_with_structured_shapes_and_nm(family, tmp_path):
    from sparse_nlp import StructuredSparsity

    model = tiny_model(family)
    config = SparsityConfig(
        weights=[WeightSparsity(method="magnitude", sparsity=0.5, pattern="2:4")],
        structured=StructuredSparsity(heads=0.5, ffn=0.25, score="weight-norm", scope="per-layer"),
    )
    sparsify(model, config, progress=False)
    inputs = tiny_inputs()
    with torch.no_grad():
        ref = model(**inputs).logits
    save_pretrained(model, tmp_path, compact=True)
    loaded = from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(ref, loaded(**inputs).logits)
    assert [p.shape for p in loaded.parameters()] == [p.shape for p in model.parameters()]


def test_pruned_negative_zeros_still_encode_sparsely():
    weight = torch.tensor([[1.5, -0.0, 0.0, -2.0]])  # attach_mask's multiply leaves -0.0 where w < 0
    mask = torch.tensor([[True, False, False, True]])
    entry, parts = encode_tensor(weight, mask)
    assert entry["encoding"] == "bitmask"
    w2, _ = decode_bitmask(parts["mask"], parts["values"], (1, 4))
    assert torch.equal(w2, weight)  # equal as values: -0.0 == 0.0


def test_compact_loads_with_a_config_the_caller_read_from_the_folder(tmp_path):
    """What sparse-nlp evaluate does: AutoConfig.from_pretrained(folder, num_labels=...) then load."""
    from transformers import AutoConfig

    from sparse_nlp.models import load_model

    model = _sparse("bert")
    save_pretrained(model, tmp_path, compact=True)
    config = AutoConfig.from_pretrained(tmp_path, num_labels=2)
    loaded, _ = load_model(tmp_path, task="sequence-classification", config=config)
    assert loaded.config.num_labels == 2 and loaded.config._attn_implementation != ATTN_MARKER
    name, module = next(iter(masked_modules(model)))
    assert torch.equal(get_mask(loaded.get_submodule(name)), get_mask(module))


def test_expanded_frees_the_decoded_tensors_before_the_load(tmp_path, monkeypatch):
    """The decoded dense tensors are written to the temporary folder and then dropped: a suspended `expanded`
    block must not hold a second dense copy while the caller loads the model from that folder."""
    import gc
    import weakref

    import sparse_nlp.checkpoint as checkpoint_module

    model = _sparse("bert")
    save_pretrained(model, tmp_path, compact=True)
    refs = []
    read = checkpoint_module.read_compact

    def tracked(path):
        state, masks = read(path)
        refs.extend(weakref.ref(t) for t in [*state.values(), *masks.values()])
        return state, masks

    monkeypatch.setattr(checkpoint_module, "read_compact", tracked)
    with checkpoint_module.expanded(tmp_path) as folder:
        gc.collect()
        assert refs and all(r() is None for r in refs)
        assert (folder / "model.safetensors").is_file()
    loaded = from_pretrained(tmp_path)  # through the same block
    inputs = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
