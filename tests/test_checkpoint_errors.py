"""Damaged checkpoints give clear errors naming the file; failed saves leave nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

import sparse_nlp.checkpoint as checkpoint
from sparse_nlp import (
    CheckpointError,
    MetadataError,
    SparsityConfig,
    WeightSparsity,
    from_pretrained,
    save_pretrained,
    sparsify,
)
from sparse_nlp.compact import COMPACT_FILE, HEADER_KEY, CompactFormatError

from .conftest import VOCAB, tiny_model


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def _saved(tmp_path: Path, compact: bool = False, tokenizer: bool = False) -> Path:
    model = tiny_model("bert")
    sparsify(
        model, SparsityConfig(weights=[WeightSparsity(method="magnitude", sparsity=0.75)]), progress=False
    )
    out = tmp_path / ("compact" if compact else "dense")
    save_pretrained(model, out, compact=compact, tokenizer=_tokenizer() if tokenizer else None)
    return out


def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _fix_manifest(folder: Path, name: str) -> None:
    """Make config.json agree with a file we rewrote, so the check under test is the one that fires."""
    raw = json.loads((folder / "config.json").read_text())
    raw["sparse_nlp"]["files"][name] = (folder / name).stat().st_size
    raw["sparse_nlp"]["sha256"][name] = checkpoint.file_sha256(folder / name)
    (folder / "config.json").write_text(json.dumps(raw))


def _rewrite_header(path: Path, edit) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(meta, tensors)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("name", ["model.safetensors", "sparse_masks.safetensors"])
def test_truncated_dense_files_are_named(tmp_path, name):
    folder = _saved(tmp_path)
    _truncate(folder / name)
    with pytest.raises(CheckpointError, match=rf"{name}.*truncated"):
        from_pretrained(folder)


def test_truncated_compact_file_is_named(tmp_path):
    folder = _saved(tmp_path, compact=True)
    _truncate(folder / COMPACT_FILE)
    with pytest.raises(CheckpointError, match=rf"{COMPACT_FILE}.*truncated"):
        from_pretrained(folder)


def test_truncated_file_is_caught_without_our_manifest(tmp_path):
    model = tiny_model("bert")
    model.save_pretrained(tmp_path)  # a plain checkpoint: only the safetensors header can tell
    _truncate(tmp_path / "model.safetensors", 0.9)
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: truncated: expected \d+ bytes, found \d+"
    ):
        from_pretrained(tmp_path)


def test_compact_shape_disagreeing_with_header(tmp_path):
    folder = _saved(tmp_path, compact=True)

    def edit(meta, tensors):
        header = json.loads(meta[HEADER_KEY])
        key = next(k for k, e in header["tensors"].items() if e["encoding"] == "bitmask")
        header["tensors"][key]["shape"][0] += 1
        meta[HEADER_KEY] = json.dumps(header)

    _rewrite_header(folder / COMPACT_FILE, edit)
    _fix_manifest(folder, COMPACT_FILE)
    with pytest.raises(CompactFormatError, match=rf"{COMPACT_FILE}: tensor '.*' disagrees with its header"):
        from_pretrained(folder)


def test_dense_tensor_shape_disagreeing_with_header(tmp_path):
    folder = _saved(tmp_path, compact=True)

    def edit(meta, tensors):
        header = json.loads(meta[HEADER_KEY])
        key = next(
            k for k, e in header["tensors"].items() if e["encoding"] == "dense" and len(e["shape"]) == 1
        )
        header["tensors"][key]["shape"] = [header["tensors"][key]["shape"][0] * 2]
        meta[HEADER_KEY] = json.dumps(header)

    _rewrite_header(folder / COMPACT_FILE, edit)
    _fix_manifest(folder, COMPACT_FILE)
    with pytest.raises(CompactFormatError, match=r"has shape \(\d+,\) but the header records"):
        from_pretrained(folder)


def test_mask_shape_disagreeing_with_metadata(tmp_path):
    folder = _saved(tmp_path)

    def edit(meta, tensors):
        shapes = json.loads(meta["shapes"])
        key = next(iter(shapes))
        shapes[key] = [shapes[key][0] * 2, shapes[key][1]]
        meta["shapes"] = json.dumps(shapes)

    _rewrite_header(folder / "sparse_masks.safetensors", edit)
    _fix_manifest(folder, "sparse_masks.safetensors")
    with pytest.raises(
        CheckpointError, match=r"sparse_masks\.safetensors: mask '.*' holds \d+ bytes but its recorded shape"
    ):
        from_pretrained(folder)


def test_metadata_version_from_the_future(tmp_path):
    folder = _saved(tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    raw["sparse_nlp"]["format_version"] = 99
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(MetadataError, match=r"config\.json.*format_version 99.*Upgrade sparse_nlp"):
        from_pretrained(folder)


def test_compact_version_from_the_future(tmp_path):
    folder = _saved(tmp_path, compact=True)

    def edit(meta, tensors):
        header = json.loads(meta[HEADER_KEY])
        header["version"] = 99
        meta[HEADER_KEY] = json.dumps(header)

    _rewrite_header(folder / COMPACT_FILE, edit)
    _fix_manifest(folder, COMPACT_FILE)
    with pytest.raises(CompactFormatError, match=rf"{COMPACT_FILE}: compact format version 99 is newer"):
        from_pretrained(folder)


@pytest.mark.parametrize("compact", [False, True])
def test_missing_tokenizer_is_named(tmp_path, compact):
    folder = _saved(tmp_path, compact=compact, tokenizer=True)
    assert (folder / "tokenizer.json").is_file()
    from_pretrained(folder)  # intact: loads
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: tokenizer file is missing"):
        from_pretrained(folder)


def test_missing_compact_weights_are_named(tmp_path):
    folder = _saved(tmp_path, compact=True)
    (folder / COMPACT_FILE).unlink()
    with pytest.raises(CheckpointError, match=rf"{COMPACT_FILE}: file is missing"):
        from_pretrained(folder)


def test_config_that_is_not_json(tmp_path):
    folder = _saved(tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        from_pretrained(folder)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("stage", ["compact_folder", "_write_manifest"])
def test_failed_save_leaves_nothing_half_written(tmp_path, monkeypatch, stage):
    folder = _saved(tmp_path)  # an earlier good save in the target folder
    before = _snapshot(folder)
    model = tiny_model("bert", seed=5)
    sparsify(
        model, SparsityConfig(weights=[WeightSparsity(method="magnitude", sparsity=0.5)]), progress=False
    )

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint, stage, boom)
    with pytest.raises(CheckpointError, match="simulated"):  # an I/O error is one clear CheckpointError
        save_pretrained(model, folder, compact=True)
    with pytest.raises(CheckpointError, match="simulated"):
        save_pretrained(model, tmp_path / "fresh", compact=True)
    assert _snapshot(folder) == before  # the earlier checkpoint is untouched
    assert not (tmp_path / "fresh").exists()
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))  # lock files stay
    assert left == ["dense"]  # no temporary folders left behind
    monkeypatch.undo()
    assert from_pretrained(folder) is not None  # and it still loads
