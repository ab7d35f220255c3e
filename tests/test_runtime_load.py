"""`from_pretrained(path, runtime="sparse")` loading layer by layer: the same model as load-then-convert."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sparse_nlp
import sparse_nlp.checkpoint as checkpoint_module
from sparse_nlp import runtime
from sparse_nlp.compact import COMPACT_FILE, HEADER_KEY, CompactFormatError
from sparse_nlp.config import SparsityConfig
from sparse_nlp.errors import CheckpointError
from sparse_nlp.pruning.masking import get_mask
from sparse_nlp.runtime import load as load_module

from .conftest import tiny_inputs, tiny_model
from .test_checkpoint_errors import _fix_manifest, _rewrite_header, _saved, _truncate


def _checkpoints(tmp_path, family: str, sparsity: float = 0.8, pattern: str = "unstructured"):
    """(masked model, its dense checkpoint folder, its compact checkpoint folder)."""
    model = tiny_model(family)
    config = SparsityConfig.magnitude(sparsity, targets="all-linear", pattern=pattern)
    sparse_nlp.sparsify(model, config, progress=False)
    dense, compact = tmp_path / "dense", tmp_path / "compact"
    sparse_nlp.save_pretrained(model, dense)
    sparse_nlp.compact_checkpoint(dense, compact)
    return model, dense, compact


@pytest.fixture(autouse=True)
def _fixed_plans(monkeypatch) -> list[tuple]:
    """A deterministic stand-in for the timed autotune (timings differ between two loads): a plan from the packed
    weight alone, mixing methods. Records what each call saw, so the two load paths can be compared."""
    from sparse_nlp.runtime import autotune

    seen: list[tuple] = []

    def choose(csr, bias, buckets, methods=(), **kwargs):
        seen.append(
            (csr.shape, csr.nnz, float(csr.vals.sum()), None if bias is None else float(bias.detach().sum()))
        )
        first = "native" if csr.nnz % 2 else "torch_csr"
        return {b: (first if i == 0 else "native") for i, b in enumerate(buckets)}

    monkeypatch.setattr(autotune, "choose", choose)
    return seen


def _no_dense_load(monkeypatch):
    """Make the dense load paths fail, so a test sees the layer-by-layer path or an error."""

    def refuse(*args, **kwargs):
        raise AssertionError("the dense load path was used")

    monkeypatch.setattr(checkpoint_module, "_load_folder", refuse)
    monkeypatch.setattr(checkpoint_module, "read_compact", refuse)


def _assert_same(ref, fast) -> None:
    """Same layers packed, same plans, masks, tensors, config and logits."""
    ref_layers, fast_layers = runtime.converted_layers(ref), runtime.converted_layers(fast)
    assert list(ref_layers) == list(fast_layers) and ref_layers
    for name, layer in ref_layers.items():
        other = fast_layers[name]
        assert layer.plan == other.plan, name
        assert torch.equal(layer.csr.vals, other.csr.vals) and torch.equal(layer.csr.cols, other.csr.cols), (
            name
        )
        assert torch.equal(get_mask(layer), get_mask(other)), name
    assert [type(m) for m in ref.modules()] == [type(m) for m in fast.modules()]
    ref_state, fast_state = ref.state_dict(), fast.state_dict()
    assert list(ref_state) == list(fast_state)
    assert all(torch.equal(ref_state[k], fast_state[k]) for k in ref_state)
    assert ref.config.to_dict() == fast.config.to_dict()
    assert not fast.training
    if ref.can_generate():
        assert ref.generation_config.to_dict() == fast.generation_config.to_dict()
    inputs = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(ref(**inputs).logits, fast(**inputs).logits)


@pytest.mark.parametrize("kind", ["dense", "compact"])
def test_runtime_load_equals_load_then_convert(family, kind, tmp_path, monkeypatch, _fixed_plans):
    _, dense, compact = _checkpoints(tmp_path, family)
    folder = dense if kind == "dense" else compact
    ref = runtime.convert(sparse_nlp.from_pretrained(folder))
    ref_calls = sorted(_fixed_plans)
    _fixed_plans.clear()
    _no_dense_load(monkeypatch)
    fast = sparse_nlp.from_pretrained(folder, runtime="sparse")
    assert sorted(_fixed_plans) == ref_calls  # the autotune saw the same packed weights and biases
    _assert_same(ref, fast)


def test_runtime_load_nm_checkpoint_and_tied_embeddings(tmp_path, monkeypatch):
    _, _, compact = _checkpoints(tmp_path, "gpt2", sparsity=0.5, pattern="2:4")
    with safe_open(str(compact / COMPACT_FILE), framework="pt") as f:
        encodings = {e["encoding"] for e in json.loads(f.metadata()[HEADER_KEY])["tensors"].values()}
    assert "nm" in encodings
    ref = runtime.convert(sparse_nlp.from_pretrained(compact))
    _no_dense_load(monkeypatch)
    fast = sparse_nlp.from_pretrained(compact, runtime="sparse")
    assert fast.lm_head.weight is fast.transformer.wte.weight  # tied, as after a dense load
    assert ref.lm_head.weight is ref.transformer.wte.weight
    masks_fast = {n: get_mask(m) for n, m in fast.named_modules() if get_mask(m) is not None}
    masks_ref = {n: get_mask(m) for n, m in ref.named_modules() if get_mask(m) is not None}
    assert masks_fast.keys() == masks_ref.keys() and masks_fast
    assert all(torch.equal(masks_fast[n], masks_ref[n]) for n in masks_ref)


def test_runtime_load_holds_one_dense_layer_at_a_time(tmp_path, monkeypatch):
    """Each masked layer's dense module (its weight and mask) is gone, packed and dropped, before the next layer is
    decoded."""
    _, _, compact = _checkpoints(tmp_path, "bert", sparsity=0.9)
    decode, attach = load_module.decode_entry, load_module.give_mask
    alive: list[weakref.ref] = []
    checked = []

    def tracked_decode(key, entry, stored, where):
        weight, mask = decode(key, entry, stored, where)
        if mask is not None:  # a masked layer: every earlier dense layer must be freed by now
            gc.collect()
            checked.append(sum(r() is not None for r in alive))
        return weight, mask

    def tracked_attach(module, mask):
        alive.extend([weakref.ref(module), weakref.ref(module.weight)])
        attach(module, mask)

    monkeypatch.setattr(load_module, "decode_entry", tracked_decode)
    monkeypatch.setattr(load_module, "give_mask", tracked_attach)
    fast = sparse_nlp.from_pretrained(compact, runtime="sparse", check_hashes=False)
    assert len(checked) == len(runtime.converted_layers(fast)) >= 8
    assert checked == [0] * len(checked)


def test_unsupported_load_options_fall_back_to_load_then_convert(tmp_path):
    _, _, compact = _checkpoints(tmp_path, "bert")
    ref = runtime.convert(sparse_nlp.from_pretrained(compact, attn_implementation="eager"))
    fast = sparse_nlp.from_pretrained(compact, runtime="sparse", attn_implementation="eager")
    _assert_same(ref, fast)


def test_keep_masks_matches_convert_default(tmp_path):
    model, _, compact = _checkpoints(tmp_path, "bert")
    fast = sparse_nlp.from_pretrained(compact, runtime="sparse")
    for name, layer in runtime.converted_layers(fast).items():
        assert torch.equal(get_mask(layer), get_mask(model.get_submodule(name))), name


# ---- damaged checkpoints: the same errors as the dense load ---------------------------------------------


def test_runtime_load_missing_compact_file(tmp_path):
    folder = _saved(tmp_path, compact=True)
    (folder / COMPACT_FILE).unlink()
    with pytest.raises(CheckpointError, match=rf"{COMPACT_FILE}: file is missing"):
        sparse_nlp.from_pretrained(folder, runtime="sparse")


def test_runtime_load_truncated_compact_file(tmp_path):
    folder = _saved(tmp_path, compact=True)
    _truncate(folder / COMPACT_FILE)
    with pytest.raises(CheckpointError, match=rf"{COMPACT_FILE}.*truncated"):
        sparse_nlp.from_pretrained(folder, runtime="sparse")


@pytest.mark.parametrize("check_hashes", [True, False])
def test_runtime_load_compact_shape_disagreeing_with_header(tmp_path, check_hashes):
    folder = _saved(tmp_path, compact=True)

    def edit(meta, tensors):
        header = json.loads(meta[HEADER_KEY])
        key = next(k for k, e in header["tensors"].items() if e["encoding"] == "bitmask")
        header["tensors"][key]["shape"][0] += 1
        meta[HEADER_KEY] = json.dumps(header)

    _rewrite_header(folder / COMPACT_FILE, edit)
    _fix_manifest(folder, COMPACT_FILE)
    with pytest.raises(CompactFormatError, match=rf"{COMPACT_FILE}: tensor '.*' disagrees with its header"):
        sparse_nlp.from_pretrained(folder, runtime="sparse", check_hashes=check_hashes)


def test_runtime_load_compact_version_from_the_future(tmp_path):
    folder = _saved(tmp_path, compact=True)

    def edit(meta, tensors):
        header = json.loads(meta[HEADER_KEY])
        header["version"] = 99
        meta[HEADER_KEY] = json.dumps(header)

    _rewrite_header(folder / COMPACT_FILE, edit)
    _fix_manifest(folder, COMPACT_FILE)
    with pytest.raises(CompactFormatError, match=rf"{COMPACT_FILE}: compact format version 99 is newer"):
        sparse_nlp.from_pretrained(folder, runtime="sparse")


def test_runtime_load_compact_tensor_missing_from_the_file(tmp_path):
    folder = _saved(tmp_path, compact=True)

    def edit(meta, tensors):
        key = next(k for k in tensors if k.endswith(".__values"))
        del tensors[key]

    _rewrite_header(folder / COMPACT_FILE, edit)
    _fix_manifest(folder, COMPACT_FILE)
    with pytest.raises(CompactFormatError, match=rf"{COMPACT_FILE}: tensor '.*': missing"):
        sparse_nlp.from_pretrained(folder, runtime="sparse")
    with pytest.raises(CompactFormatError, match=rf"{COMPACT_FILE}: tensor '.*': missing"):
        sparse_nlp.from_pretrained(folder)


def test_runtime_load_weight_nonzero_where_the_mask_prunes(tmp_path):
    folder = _saved(tmp_path)
    path = folder / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    key = next(k for k, t in tensors.items() if k.endswith("query.weight"))
    weight = tensors[key].clone()
    weight[weight == 0] = 0.5  # every pruned entry now nonzero
    tensors[key] = weight
    save_file(tensors, str(path), metadata=meta)
    _fix_manifest(folder, "model.safetensors")
    for kwargs in ({}, {"runtime": "sparse"}):
        with pytest.raises(CheckpointError, match=r"nonzero weights where its mask says pruned"):
            sparse_nlp.from_pretrained(folder, **kwargs)


def test_runtime_load_saves_the_same_checkpoint(tmp_path):
    """A model loaded into the runtime (masks rebuilt from the packed index) saves the tensors and masks of the
    checkpoint it came from."""
    from safetensors.torch import load_file

    model, dense, compact = _checkpoints(tmp_path, "llama", sparsity=0.8)
    fast = sparse_nlp.from_pretrained(compact, runtime="sparse", check_hashes=False)
    layers = runtime.converted_layers(fast)
    assert layers and all(not any(b.dtype == torch.bool for b in m.buffers()) for m in layers.values())
    sparse_nlp.save_pretrained(fast, tmp_path / "again")
    before, after = (
        load_file(dense / "model.safetensors"),
        load_file(tmp_path / "again" / "model.safetensors"),
    )
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    masks = checkpoint_module.MASKS_FILE
    assert (
        checkpoint_module.load_masks(dense / masks).keys()
        == checkpoint_module.load_masks(tmp_path / "again" / masks).keys()
    )
    for name, mask in checkpoint_module.load_masks(dense / masks).items():
        assert torch.equal(mask, checkpoint_module.load_masks(tmp_path / "again" / masks)[name]), name
    meta = [json.loads((d / "config.json").read_text())["sparse_nlp"] for d in (dense, tmp_path / "again")]
    assert meta[0]["masked_modules"] == meta[1]["masked_modules"]
    assert meta[0].get("kept_zeros") == meta[1].get("kept_zeros")


def test_runtime_load_hands_free_memory_back_after_each_layer(tmp_path, monkeypatch):
    """The freed temporaries of each layer are handed back (glibc malloc_trim; a no-op returning False elsewhere)."""
    _, _, compact = _checkpoints(tmp_path, "bert", sparsity=0.9)
    real, calls = load_module.release_free_memory, []
    monkeypatch.setattr(load_module, "release_free_memory", lambda: calls.append(real()) or calls[-1])
    fast = sparse_nlp.from_pretrained(compact, runtime="sparse", check_hashes=False)
    assert len(calls) == len(runtime.converted_layers(fast)) + 1
    import platform
    import sys

    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert calls == [glibc] * len(calls)


def test_mask_check_counts_negative_zero_as_pruned():
    weight = torch.tensor([[1.0, -0.0], [0.0, 2.0]])
    mask = torch.tensor([[True, False], [True, True]])
    checkpoint_module._verify_mask("m", weight, mask, "where", "path", {"m": 1})  # one kept zero, recorded
    with pytest.raises(CheckpointError, match="flipped"):
        checkpoint_module._verify_mask("m", weight, mask, "where", "path", {})
    with pytest.raises(CheckpointError, match="nonzero weights"):
        checkpoint_module._verify_mask("m", weight, ~mask, "where", "path", None)


def test_runtime_load_layer_left_dense_is_masked_as_a_dense_load(tmp_path, monkeypatch):
    """A layer the conversion leaves dense (too dense to pack) keeps its mask, zeros and zero-keeping hooks."""
    from sparse_nlp.pruning.masking import masked_modules

    model, _, compact = _checkpoints(tmp_path, "bert", sparsity=0.2)  # density 0.8 > MAX_DENSITY
    fast = sparse_nlp.from_pretrained(compact, runtime="sparse", check_hashes=False)
    assert not runtime.converted_layers(fast)
    masked = dict(masked_modules(fast))
    assert masked.keys() == dict(masked_modules(model)).keys()
    fast.train()
    optimizer = torch.optim.SGD(fast.parameters(), lr=1.0)
    fast(**tiny_inputs()).logits.sum().backward()
    optimizer.step()
    for name, module in masked.items():
        assert torch.equal(get_mask(module), get_mask(model.get_submodule(name))), name
        assert not bool(module.weight[~get_mask(module)].any()), name


def test_runtime_options_reach_convert_on_both_load_paths(tmp_path):
    """``runtime_options`` go to `convert` whether the checkpoint loads layer by layer or dense first; a plan of
    native products only keeps no dense copy of any layer. Unknown options, and options without the sparse runtime,
    are refused before loading."""
    _, dense, compact = _checkpoints(tmp_path, "llama")
    options = {"methods": ["native"], "tokens": [1, 16]}
    loads = [
        sparse_nlp.from_pretrained(dense, runtime="sparse", runtime_options=options),
        sparse_nlp.from_pretrained(compact, runtime="sparse", runtime_options=options),
        sparse_nlp.from_pretrained(
            compact, runtime="sparse", runtime_options=options, attn_implementation="eager"
        ),  # dense load, then convert
    ]
    for fast in loads:
        layers = runtime.converted_layers(fast)
        assert layers and all(layer.plan == {1: "native", 16: "native"} for layer in layers.values())
        assert all(layer.dense_weight is None for layer in layers.values())
    with pytest.raises(CheckpointError, match=r"unknown \['fuse'\]"):
        sparse_nlp.from_pretrained(compact, runtime="sparse", runtime_options={"fuse": False})
    with pytest.raises(CheckpointError, match="runtime='sparse' only"):
        sparse_nlp.from_pretrained(compact, runtime_options={"methods": ["native"]})
