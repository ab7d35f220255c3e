"""Save and load sparse models so that `from_pretrained` gives back exactly the same model.

A sparse checkpoint is a normal transformers checkpoint:

- ``model.safetensors`` (dense, pruned entries exactly 0.0) and ``config.json`` with our metadata under
  the ``sparse_nlp`` key, which plain ``AutoModel.from_pretrained`` loads as an ordinary model;
- ``sparse_masks.safetensors``: each mask as packed bits (uint8), so masks come back exactly even where a
  kept weight happens to be 0.0;
- ``sparsity_config.json``: the `SparsityConfig` (the recipe) beside the model, for people and tools.

With ``compact=True`` the dense weight files are replaced by ``sparse_nlp_compact.safetensors`` (masked
weights as packed bitmask + kept values, N:M weights as values + small indices; see `sparse_nlp.compact`),
which plain transformers refuses with an error naming sparse_nlp instead of loading random weights.

Saves are atomic: the whole new checkpoint is built in a hidden folder beside the target and switched in
by renaming whole folders, so a reader sees the old checkpoint or the new one, never a mix, and a killed
save leaves the old one intact (its leftovers are removed, with a warning, by the next save). Concurrent
saves to one folder take turns through a lock file beside it (``.<name>.lock``). Files in the old folder
that are not part of the checkpoint (a Trainer folder, evaluation JSONs) move to the new one.

The metadata lists every file of the checkpoint with its size and SHA-256 (``sparse_nlp.files``,
``sparse_nlp.sha256``) and a per-save id, also stamped into every safetensors file, so a truncated,
missing, modified or swapped file is reported by name on load, before any weight is read. A load that
overlaps a save is retried on the new checkpoint. Checkpoints written before these fields load with the
checks they allow (sizes and headers).
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import transformers
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, GenerationConfig, PreTrainedModel

from .activation.apply import restore_activation
from .attention.apply import apply_attention
from .errors import CheckpointError, CompactFormatError, MetadataError
from .formats import compact as compact_format
from .formats.compact import ATTN_MARKER, HEADER_KEY, is_compact, mask_owner, parse_header
from .formats.manifest import (
    CHECKPOINT_PATTERNS,
    COMPACT_FILE,
    CONFIG_FILE,
    INDEX_FILE,
    MASKS_FILE,
    METADATA_KEY,
    SAVE_ID_KEY,
    listed_files,
    manifest_problem,
    safetensors_problem,
    with_manifest,
)
from .formats.masks import check_masks, encode_masks, mask_metadata, pack_bits, unpack_bits
from .metadata import raw_metadata, read_metadata, write_metadata
from .pruning.experts import attach_expert_mask, masked_experts
from .pruning.masking import MASK_BUFFER, attach_mask, get_mask, masked_modules
from .pruning.offloaded import block_store
from .runtime.convert import convert
from .runtime.load import load_packed, plan_load
from .structured.shapes import load_structured
from .targets import base_relative_name, resolve_module

logger = logging.getLogger(__name__)


# ---- masks as packed bits ----------------------------------------------------------------------------


def write_masks(masks: dict[str, torch.Tensor], path: Path) -> int:
    """Write bool masks (by base-relative module name) as packed bits with their shapes in the header."""
    tensors, metadata = encode_masks(masks)
    if tensors:
        save_file(tensors, str(path), metadata=metadata)
    return len(tensors)


def save_masks(model: nn.Module, path: Path) -> int:
    masks = {
        base_relative_name(model, name): get_mask(module)
        for name, module in masked_modules(model, derived=True)
    }
    masks.update((base_relative_name(model, name), mask) for name, _, _, mask in masked_experts(model))
    return write_masks(masks, path)


def load_masks(path: Path) -> dict[str, torch.Tensor]:
    """Read a mask file written by `write_masks`: bool masks by base-relative module name."""
    return {name: unpack_bits(bits, shape) for name, (bits, shape) in load_packed_masks(path).items()}


def load_packed_masks(path: Path) -> dict[str, tuple[torch.Tensor, tuple[int, ...]]]:
    """Read a mask file written by `write_masks`, checked but not unpacked: (packed bits, shape) by base-relative
    module name (`unpack_bits` gives the bool mask; a loader unpacks one layer's at a time)."""
    try:
        packed = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        shapes = json.loads(header["shapes"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError, RuntimeError) as err:
        raise CheckpointError(
            f"{path}: mask file is damaged or not a sparse_nlp mask file ({err})."
        ) from None
    try:
        return check_masks(packed, shapes)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None


# ---- damaged files ---------------------------------------------------------------------------------------


def check_safetensors(path: Path) -> dict[str, Any]:
    """Raise `CheckpointError` naming `path` when its header is unreadable or the file is shorter/longer than it
    says; the parsed header otherwise."""
    size = path.stat().st_size
    header = None
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else None
            if n is not None and n <= size - 8:
                header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: damaged safetensors header ({err}).") from None
    if header is not None and not isinstance(header, dict):
        raise CheckpointError(f"{path}: damaged safetensors header (not a JSON object).")
    try:
        problem = safetensors_problem(size, n, header)
    except (KeyError, TypeError, IndexError, AttributeError) as err:
        raise CheckpointError(f"{path}: damaged safetensors header ({type(err).__name__}: {err}).") from None
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    return header


HASH_ENV = "SPARSE_NLP_VERIFY_HASHES"
"""Set to ``0`` to skip the SHA-256 check of checkpoint files on load (sizes, headers and save ids are still
checked); for very large checkpoints on trusted storage. ``from_pretrained(..., check_hashes=False)`` and
``verify_checkpoint(..., check_hashes=False)`` do the same for one call."""


def file_sha256(path: Path) -> str:
    """The SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _hashes_wanted(check_hashes: bool | None) -> bool:
    if check_hashes is not None:
        return bool(check_hashes)
    return os.environ.get(HASH_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def verify_checkpoint(
    folder: str | os.PathLike, *, check_hashes: bool | None = None
) -> dict[str, Any] | None:
    """Check a local checkpoint folder before loading it: config.json, the manifest's types, every listed file
    (inside the folder, present, its size and SHA-256), weight headers and their save id.

    Args:
        folder: The checkpoint folder.
        check_hashes: Compare every listed file with its recorded SHA-256 (default: yes, unless the
            environment variable ``SPARSE_NLP_VERIFY_HASHES`` is ``0``). Checkpoints saved before hashes were
            recorded are checked by size and header only.

    Returns the raw ``sparse_nlp`` metadata dict (None for a plain checkpoint).

    Raises:
        CheckpointError: a missing, truncated, modified or damaged file, or one from another save (named).
        MetadataError: malformed metadata or a format version newer than this sparse_nlp.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        if folder.is_dir():
            raise CheckpointError(
                f"{config_path}: missing; is {str(folder)!r} a model folder saved with save_pretrained?"
            )
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} does not exist.")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err}).") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path}: not a JSON object.")
    meta = raw.get(METADATA_KEY)
    if meta is None:
        ours = [n for n in (MASKS_FILE, COMPACT_FILE) if (folder / n).is_file()]
        if ours:
            raise MetadataError(
                f"{config_path}: no {METADATA_KEY!r} key, but the folder holds {ours[0]}; the metadata was "
                "removed or config.json was replaced, so the masks would be ignored. Restore config.json."
            )
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise CheckpointError(
                f"{folder}: no weights (model.safetensors or shards) beside config.json; the checkpoint is incomplete."
            )
    else:
        try:
            raw_metadata(SimpleNamespace(**{METADATA_KEY: meta}))
        except MetadataError as err:
            raise MetadataError(f"{config_path}: {err}") from None
        problem = manifest_problem(meta)
        if problem is not None:
            raise MetadataError(f"{config_path}: {METADATA_KEY}.{problem}")
        digests = meta.get("sha256") or {}
        hashes = _hashes_wanted(check_hashes)
        save_id = meta.get("save_id")
        for name, size, kind in listed_files(meta):
            path = folder / name
            if not path.is_file():
                raise CheckpointError(
                    f"{path}: {kind} is missing; config.json ({METADATA_KEY}.files) lists it as part of this checkpoint."
                )
            if path.stat().st_size != size:
                raise CheckpointError(
                    f"{path}: {kind} has {path.stat().st_size} bytes but was saved with {size}; it is truncated or was replaced."
                )
            if hashes and name in digests and file_sha256(path) != digests[name]:
                raise CheckpointError(
                    f"{path}: {kind} content differs from the save (SHA-256 mismatch with config.json "
                    f"{METADATA_KEY}.sha256); it was modified or damaged. Restore it or save the model again."
                )
            if save_id is not None and name.endswith(".safetensors"):
                stamp = (check_safetensors(path).get("__metadata__") or {}).get(SAVE_ID_KEY)
                if stamp != save_id:
                    raise CheckpointError(
                        f"{path}: {kind} belongs to {'save ' + repr(stamp) if stamp else 'another save'}, "
                        f"but config.json is from save {save_id!r}; the folder mixes files of two saves."
                    )
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors(path)
    return meta


# ---- save ----------------------------------------------------------------------------------------------


def save_pretrained(
    model: PreTrainedModel,
    save_directory: str | os.PathLike,
    *,
    tokenizer: Any = None,
    compact: bool = False,
    **kwargs: Any,
) -> Path:
    """Write `model` (and optionally its tokenizer) as a sparse checkpoint that `from_pretrained` restores exactly.

    The save is atomic: the checkpoint is built in a hidden folder beside `save_directory` and switched in
    whole, so readers see the old checkpoint or the new one and a killed save leaves the old one. Saves to
    one folder take turns (a lock file ``.<name>.lock`` beside it); leftovers of a killed save are removed,
    with a warning, by the next one. Files of the old folder that are not part of its checkpoint (a Trainer
    folder, evaluation JSONs) are kept.

    Args:
        model: A model sparsified by `sparse_nlp.sparsify` (a plain model is saved as a plain checkpoint).
            A model whose blocks are on disk (sequential onloading, `sparse_nlp.pruning.onloading`) is
            streamed: each block's tensors are copied from its offload file into the checkpoint, so the
            whole model is never in memory; the files are the same, byte for byte, as the in-memory save's.
        save_directory: Output folder; created if needed. An earlier checkpoint there is replaced.
        tokenizer: Saved beside the model when given.
        compact: Write the compact format (`sparse_nlp.compact`): smaller on disk, loadable only through
            `sparse_nlp.from_pretrained`. Needs a sparsified model.
        **kwargs: Passed to ``model.save_pretrained`` (e.g. ``max_shard_size``).

    Returns:
        The output folder.

    Raises:
        CheckpointError: the target is not a folder, or the disk is full or not writable (the old
            checkpoint, if any, is left as it was).
    """
    out = Path(save_directory)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"cannot save to {str(out)!r}: it exists and is not a folder.")
    config = read_metadata(model.config)
    store = block_store(model)
    if store is not None and compact:
        raise CheckpointError(
            "compact=True cannot be streamed from a model whose blocks are on disk (offload_dir): save it "
            "without compact, then write the compact copy with compact_checkpoint(saved, out)."
        )
    streamed = _offloaded_masks(model, store) if store is not None else None
    if config is not None:
        # refresh the list of masked modules (read from the block files when the blocks are on disk)
        write_metadata(model, config, **({"masked_modules": streamed[2]} if streamed else {}))
    elif compact:
        raise CheckpointError(
            "compact=True needs a model sparsified by sparse_nlp (its config has no sparse_nlp metadata)."
        )

    def build(tmp: Path, save_id: str) -> None:
        if store is None:
            model.save_pretrained(tmp, **kwargs)
        else:
            with _streamed_weights(store):
                model.save_pretrained(tmp, **kwargs)
        tokenizer_files = []
        if tokenizer is not None:
            before = {p.name for p in tmp.iterdir()}
            tokenizer.save_pretrained(tmp)
            tokenizer_files = sorted({p.name for p in tmp.iterdir()} - before)
        if config is not None:
            if streamed is None:
                save_masks(model, tmp / MASKS_FILE)
                zeros = kept_zeros(model)
            else:
                packed, shapes, _, zeros = streamed
                if packed:
                    save_file(packed, str(tmp / MASKS_FILE), metadata=mask_metadata(shapes))
            (tmp / CONFIG_FILE).write_text(config.to_json() + "\n")
            if compact:
                compact_folder(tmp)
            _write_manifest(tmp, tokenizer_files, save_id, zeros)

    _atomic_save(out, build)
    logger.info("saved sparse checkpoint to %s", out)
    return out


# ---- streamed save of a model whose blocks are on disk --------------------------------------------------------


def _offloaded_masks(
    model: nn.Module, store: Any
) -> tuple[dict[str, torch.Tensor], dict[str, list[int]], list[str], dict[str, int]]:
    """Walk the blocks one at a time: (packed masks, their shapes, masked module names, kept zeros), all by
    base-relative name in module order, as `save_masks` and `kept_zeros` give them for the model in memory.

    Every block ends up written to the store's folder (a block never written is written now), so the weight
    files can be copied from there.
    """
    packed: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    names: list[str] = []
    zeros: dict[str, int] = {}
    for i in range(len(store.blocks)):
        was_loaded = store.is_loaded(i)
        block = store.onload(i)
        for rel, module in block.named_modules():
            mask = module._buffers.get(MASK_BUFFER)
            if mask is None:
                continue
            name = base_relative_name(model, f"{store.prefix}.{i}.{rel}")
            names.append(name)
            packed[name] = pack_bits(mask)
            shapes[name] = list(mask.shape)
            count = int((mask.bool() & (module.weight.detach() == 0)).sum())
            if count:
                zeros[name] = count
        if not was_loaded:
            store.offload(i, write=i not in store.written)
    return packed, shapes, names, zeros


_COPY_CHUNK = 1 << 20


def _safetensors_data_start(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the first tensor byte, parsed header) of a safetensors file."""
    header = check_safetensors(path)
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little"), header


def _header_bytes(header: dict[str, Any]) -> bytes:
    """A safetensors header as the library writes it: compact JSON padded with spaces to a multiple of 8."""
    data = json.dumps(header, separators=(",", ":")).encode()
    return data + b" " * (-len(data) % 8)


def _layout(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> tuple[list[str], list[str]]:
    """(header key order, data order) that ``safetensors.torch.save_file`` uses for these names and dtypes.

    Both orders depend only on names and dtypes, so they are read from the library's own output for one
    element per tensor, and the header format is checked against it.
    """
    from safetensors.torch import save

    raw = save({k: torch.zeros(1, dtype=t.dtype) for k, t in tensors.items()}, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    if _header_bytes(header) != raw[8 : 8 + n]:
        raise CheckpointError(
            "this safetensors version writes headers differently; stream-saving is not possible."
        )
    names = [k for k in header if k != "__metadata__"]
    return list(header), sorted(names, key=lambda k: header[k]["data_offsets"][0])


_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors_streamed(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None, store: Any
) -> None:
    """Write `tensors` to `path` exactly as ``safetensors.torch.save_file`` would, without holding them.

    A tensor on the ``meta`` device is a block tensor whose bytes are copied, a chunk at a time, from the
    store's offload file (``store.tensor_file(name)``); other tensors are written from memory.
    """
    key_order, data_order = _layout(tensors, metadata)
    header: dict[str, Any] = {}
    offset, offsets = 0, {}
    for name in data_order:
        t = tensors[name]
        if t.dtype not in _DTYPES:
            raise CheckpointError(f"{name}: dtype {t.dtype} cannot be stream-saved.")
        size = t.numel() * t.element_size()
        offsets[name] = (offset, offset + size)
        offset += size
    for key in key_order:
        if key == "__metadata__":
            header[key] = dict(metadata or {})
        else:
            t = tensors[key]
            header[key] = {
                "dtype": _DTYPES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": list(offsets[key]),
            }
    head = _header_bytes(header)
    with open(path, "wb") as out:
        out.write(len(head).to_bytes(8, "little"))
        out.write(head)
        for name in data_order:
            t = tensors[name]
            if not t.is_meta:
                out.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
                continue
            source, key = store.tensor_file(name)
            start, source_header = _safetensors_data_start(source)
            entry = source_header.get(key)
            if entry is None or entry["dtype"] != _DTYPES[t.dtype] or entry["shape"] != list(t.shape):
                raise CheckpointError(
                    f"{source}: {key!r} is missing or differs in dtype or shape from {name}."
                )
            begin, end = entry["data_offsets"]
            with open(source, "rb") as f:
                f.seek(start + begin)
                remaining = end - begin
                while remaining:
                    chunk = f.read(min(_COPY_CHUNK, remaining))
                    if not chunk:
                        raise CheckpointError(f"{source}: shorter than its header says.")
                    out.write(chunk)
                    remaining -= len(chunk)
        if out.tell() != 8 + len(head) + offset:
            raise CheckpointError(f"{path}: wrote {out.tell()} bytes, expected {8 + len(head) + offset}.")


@contextmanager
def _streamed_weights(store: Any) -> Iterator[None]:
    """Inside: transformers' ``save_pretrained`` writes its weight files with `write_safetensors_streamed`.

    transformers builds the state dict (tied weights removed, names as its checkpoints spell them, shards)
    from the model, whose offloaded block tensors are ``meta``; only the final file write is replaced.
    """
    from transformers import modeling_utils

    original = modeling_utils.safe_save_file

    def write(
        tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str] | None = None
    ) -> None:
        write_safetensors_streamed(tensors, filename, metadata, store)

    modeling_utils.safe_save_file = write
    try:
        yield
    finally:
        modeling_utils.safe_save_file = original


def kept_zeros(model: nn.Module) -> dict[str, int]:
    """Masked module (base-relative) -> how many weights its mask keeps that are exactly 0.0 (only nonzero counts)."""
    out = {}
    for name, module in masked_modules(model, derived=True):
        mask = get_mask(module)
        count = int((mask.bool() & (module.weight.detach() == 0)).sum())
        if count:
            out[base_relative_name(model, name)] = count
    return out


# ---- atomic folder switch ----------------------------------------------------------------------------------


def _atomic_save(out: Path, build: Any) -> None:
    """Build a checkpoint with ``build(tmp, save_id)`` in a hidden folder beside `out`, then switch it in whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    save_id = uuid.uuid4().hex
    try:
        with _save_lock(out):
            _clean_leftovers(out)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
            try:
                build(tmp, save_id)
                _fault_point("built")
                _publish(tmp, out, save_id)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as err:
        raise CheckpointError(_io_message(out, err)) from None
    except SafetensorError as err:
        if "28" in str(err) or "space" in str(err).lower():
            raise CheckpointError(_io_message(out, OSError(errno.ENOSPC, str(err)))) from None
        raise


def _io_message(out: Path, err: OSError) -> str:
    reason = os.strerror(err.errno) if err.errno else str(err)
    hint = (
        "free some space" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "check the folder's permissions"
    )
    return (
        f"cannot save to {str(out)!r}: {reason} ({getattr(err, 'filename', None) or err}); {hint} and save again. "
        "Any checkpoint already there is unchanged."
    )


def _fault_point(name: str) -> None:
    """Test hook: tests replace it to stop a save at a chosen step (as a kill would)."""


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk (so a switched-in folder survives a power loss too)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF):  # folders cannot be fsync'ed everywhere
            raise
    finally:
        os.close(fd)


@contextmanager
def _save_lock(out: Path, shared: bool = False) -> Iterator[None]:
    """Hold the lock file ``.<name>.lock`` beside `out`: exclusively for a whole save (saves to one folder take
    turns), shared by a load that kept overlapping saves. Released on exit or when the process dies."""
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): saves are still atomic, only not serialised
        yield
        return
    path = out.parent / f".{out.name}.lock"
    try:
        fd = os.open(path, os.O_RDONLY if shared else os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        if not shared:
            raise
        yield  # never saved by this sparse_nlp (or a read-only place): nothing to wait for
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _checkpoint_names(folder: Path) -> set[str]:
    """Names of the entries of `folder` that belong to its checkpoint (the rest is carried to a new save)."""
    names = {"config.json"}
    try:
        meta = json.loads((folder / "config.json").read_text()).get(METADATA_KEY)
        names |= set((meta or {}).get("files") or {})
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    for entry in folder.iterdir():
        if any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in CHECKPOINT_PATTERNS):
            names.add(entry.name)
    return names


def _carry_foreign(source: Path, target: Path) -> None:
    """Move the entries of `source` that are not part of its checkpoint into `target` (when it lacks them)."""
    if not source.is_dir() or not target.is_dir():
        return
    ours = _checkpoint_names(source)
    for entry in list(source.iterdir()):
        if entry.name not in ours and not (target / entry.name).exists():
            os.rename(entry, target / entry.name)


def _leftovers(out: Path) -> list[Path]:
    base = glob.escape(str(out.parent / f".{out.name}"))
    return [
        Path(p) for pattern in (".tmp-*", ".old-*") for p in glob.glob(base + pattern) if Path(p).is_dir()
    ]


def _clean_leftovers(out: Path) -> None:
    """Remove (with a warning) the hidden folders of killed saves to `out`; called with the lock held."""
    for leftover in _leftovers(out):
        if not out.exists() and leftover.name.startswith(f".{out.name}.old-"):
            os.rename(leftover, out)  # killed between the two renames of the fallback switch: put it back
            logger.warning("restored %s from %s, left by an interrupted save", out, leftover.name)
            continue
        _carry_foreign(leftover, out)
        size = sum(f.stat().st_size for f in leftover.rglob("*") if f.is_file())
        shutil.rmtree(leftover, ignore_errors=True)
        logger.warning("removed %s (%d bytes), left by an interrupted save to %s", leftover, size, out)


def recover(save_directory: str | os.PathLike) -> None:
    """Tidy a checkpoint folder after a killed save, as the next save would: put back files that are not part
    of the checkpoint (a Trainer folder) and remove the hidden leftovers, with a warning for each."""
    out = Path(save_directory)
    if not out.parent.is_dir() or not _leftovers(out):
        return
    with _save_lock(out):
        _clean_leftovers(out)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders atomically (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False  # the file system cannot exchange: use the two-rename fallback
    raise OSError(code, os.strerror(code), str(b))


def _publish(tmp: Path, out: Path, save_id: str) -> None:
    """Switch the finished checkpoint `tmp` in as `out` (whole folders; the old one is deleted after)."""
    for entry in tmp.rglob("*"):
        if entry.is_file():
            _fsync(entry)
    _fsync(tmp)
    if out.exists():
        _carry_foreign(out, tmp)
        _fault_point("carried")
        if _exchange(tmp, out):
            old = tmp  # the old checkpoint now lives at the temporary name
        else:
            old = out.parent / f".{out.name}.old-{save_id}"
            os.rename(out, old)
            _fault_point("moved-old")
            os.rename(tmp, out)
        _fault_point("switched")
        _fsync(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
        _fsync(out.parent)


def read_lock(folder: str | os.PathLike) -> Any:
    """A context in which no save switches the local checkpoint folder `folder` (a shared hold on its lock
    file; saves wait). For reading several things of one checkpoint that must agree; a no-op for Hub ids."""
    from contextlib import nullcontext

    return _save_lock(Path(folder), shared=True) if Path(folder).is_dir() else nullcontext()


def folder_state(folder: str | os.PathLike) -> tuple[Any, ...] | None:
    """Identity of what a checkpoint folder holds now (its inode and save id); changes with every save."""
    folder = Path(folder)
    try:
        st = os.stat(folder)
        raw = json.loads((folder / "config.json").read_text())
        meta = raw.get(METADATA_KEY) if isinstance(raw, dict) else None
        return (st.st_dev, st.st_ino, meta.get("save_id") if isinstance(meta, dict) else None)
    except (OSError, ValueError):
        return None


def compact_checkpoint(source: str | os.PathLike, save_directory: str | os.PathLike) -> Path:
    """Write a compact copy of the dense sparse_nlp checkpoint folder `source` to `save_directory`.

    The source is checked first and never modified; the output is written to a temporary folder and
    moved into place at the end. Loads bit-exact through `from_pretrained`.

    Raises:
        CheckpointError / MetadataError: a damaged source, a plain (non-sparse) or already compact checkpoint.
    """
    src, out = Path(source), Path(save_directory)
    if not src.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(src)!r} does not exist.")
    meta = verify_checkpoint(src)
    if meta is None:
        raise CheckpointError(
            f"{src / 'config.json'}: no {METADATA_KEY!r} metadata; only sparse_nlp checkpoints can be compacted."
        )
    if out.resolve() == src.resolve():
        raise CheckpointError(f"the output folder must differ from the source {str(src)!r}.")

    def build(tmp: Path, save_id: str) -> None:
        listed = meta.get("files")  # older checkpoints have no manifest: copy every file then
        for name in ["config.json", *listed] if listed else [p.name for p in src.iterdir() if p.is_file()]:
            shutil.copy2(src / name, tmp / name)
        compact_folder(tmp)
        _write_manifest(tmp, list(meta.get("tokenizer_files") or []), save_id, meta.get("kept_zeros"))

    _atomic_save(out, build)
    return out


def _write_manifest(
    folder: Path, tokenizer_files: list[str], save_id: str | None = None, zeros: dict[str, int] | None = None
) -> None:
    """Record every file of the checkpoint with its size and SHA-256, and the save id, in config.json (the id
    also goes into every safetensors file), so damage or a file of another save is named on load."""
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name != "config.json"]
    if save_id is not None:
        for p in files:
            if p.name.endswith(".safetensors"):
                _stamp_save_id(p, save_id)
    sizes = {p.name: p.stat().st_size for p in files}
    digests = {p.name: file_sha256(p) for p in files} if save_id is not None else None
    meta = with_manifest(raw[METADATA_KEY], sizes, tokenizer_files, digests, save_id)
    if zeros is not None:
        meta["kept_zeros"] = dict(zeros)
    raw[METADATA_KEY] = meta
    _write_json(path, raw)


def _stamp_save_id(path: Path, save_id: str) -> None:
    """Add the save id to a safetensors file's ``__metadata__`` (the tensor bytes are copied unchanged)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header.setdefault("__metadata__", {})[SAVE_ID_KEY] = save_id
        data = json.dumps(header, separators=(",", ":")).encode()
        # the tensor bytes keep their offset modulo 64 (the alignment of the file as written, so the loaded
        # tensors have the same memory alignment and the same kernels give bit-identical outputs)
        data += b" " * ((n - len(data)) % 64)
        stamped = path.with_name(path.name + ".stamp")
        with open(stamped, "wb") as g:
            g.write(len(data).to_bytes(8, "little"))
            g.write(data)
            shutil.copyfileobj(f, g, 1 << 20)
    os.replace(stamped, path)


# ---- compact folders (the encoding itself is `sparse_nlp.formats.compact`) --------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err}).") from None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def dense_weight_files(folder: Path) -> list[Path]:
    """The dense safetensors weight files of a checkpoint folder (single file or the shards of its index)."""
    index = folder / INDEX_FILE
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{path}: weight file is damaged ({err}).") from None


def compact_folder(folder: str | os.PathLike) -> dict[str, Any]:
    """Rewrite a dense sparse_nlp checkpoint folder IN PLACE into the compact format.

    Used by `save_pretrained(..., compact=True)` on its temporary folder (and by `compact_checkpoint`, on a
    copy). Returns a summary: bytes per encoding and the dense bytes they replace.

    Args:
        folder: A folder written by `save_pretrained` (dense weights, masks file, config.json).
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    config = _read_json(config_path)
    meta = config.get(METADATA_KEY)
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{config_path}: no {METADATA_KEY!r} metadata; only sparse_nlp checkpoints can be compacted."
        )
    if "compact" in meta:
        raise CheckpointError(f"{config_path}: the checkpoint is compact already.")
    files = dense_weight_files(folder)
    if not files:
        raise CheckpointError(f"{folder}: no model.safetensors (or index) to compact.")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(_load_tensors(path))
    masks = load_masks(folder / MASKS_FILE) if (folder / MASKS_FILE).is_file() else {}
    tensors, metadata, leftover, summary = compact_format.encode_state(
        state, masks, compact_format.nm_patterns(meta)
    )
    save_file(tensors, str(folder / COMPACT_FILE), metadata=metadata)
    for path in [*files, folder / INDEX_FILE]:
        path.unlink(missing_ok=True)
    _write_json(folder / INDEX_FILE, compact_format.stub_index(list(state)))
    (folder / MASKS_FILE).unlink(missing_ok=True)
    if leftover:  # masks of weights stored dense (nothing to gain) still need their own file
        write_masks(leftover, folder / MASKS_FILE)
    _write_json(config_path, compact_format.compact_config(config))
    logger.info(
        "compacted %s: %d -> %d bytes (masked weights %d -> %d)",
        folder,
        summary["dense_bytes"],
        summary["stored_bytes"],
        summary["masked_dense_bytes"],
        summary["masked_stored_bytes"],
    )
    return summary


def read_compact(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Decode a compact weight file: (dense state dict, masks by base-relative module name).

    Raises:
        CompactFormatError: damaged file, a newer format version, or tensors that disagree with the header.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(HEADER_KEY)
            stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CompactFormatError(f"{path}: compact weight file is damaged ({err}).") from None
    return compact_format.decode_state(stored, raw, str(path))


def compact_stats(path: str | os.PathLike) -> dict[str, Any]:
    """Sizes in a compact weight file, from its header (no tensor is read); see `formats.compact.stats`."""
    with safe_open(str(path), framework="pt") as f:
        entries = json.loads((f.metadata() or {})[HEADER_KEY])["tensors"]
        stored = {}
        for name in f.keys():  # noqa: SIM118
            sl = f.get_slice(name)
            stored[name] = compact_format.DTYPE_BYTES[sl.get_dtype()] * math.prod(sl.get_shape())
    return compact_format.stats(entries, stored)


@contextmanager
def expanded(folder: str | os.PathLike) -> Iterator[Path]:
    """A temporary dense checkpoint folder equivalent to the compact one in `folder` (deleted on exit)."""
    folder = Path(folder)
    config, file = compact_format.dense_config(_read_json(folder / "config.json"))
    compact_path = folder / file
    if not compact_path.is_file():
        raise CheckpointError(
            f"{compact_path}: compact weight file is missing (config.json says the checkpoint is compact)."
        )
    state, masks = read_compact(compact_path)
    if (folder / MASKS_FILE).is_file():
        masks.update(load_masks(folder / MASKS_FILE))
    tmp = Path(tempfile.mkdtemp(prefix="sparse-nlp-expanded-"))
    try:
        for item in folder.iterdir():
            if item.is_file() and not compact_format.is_dense_only(item.name):
                shutil.copy2(item, tmp / item.name)
        _write_json(tmp / "config.json", config)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if masks:
            write_masks(masks, tmp / MASKS_FILE)
        # the decoded dense tensors are on disk now: free them before the caller loads the model from there
        # (a suspended generator keeps its locals alive, which held a second dense copy during the load)
        state = masks = None
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- load ----------------------------------------------------------------------------------------------


def _is_local(path: str | os.PathLike) -> bool:
    return Path(path).exists()


def _looks_like_hub_id(name: str) -> bool:
    parts = str(name).split("/")
    return (
        1 <= len(parts) <= 2
        and all(parts)
        and not str(name).startswith((".", "/", "~"))
        and "\\" not in str(name)
    )


def resolve_file(path_or_id: str | os.PathLike, filename: str, **hub_kwargs: Any) -> Path | None:
    """A file of a local folder or a Hub repository (downloaded to the cache), or None when it has none."""
    if _is_local(path_or_id):
        candidate = Path(path_or_id) / filename
        return candidate if candidate.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    keys = ("revision", "cache_dir", "token", "local_files_only", "force_download")
    try:
        return Path(
            hf_hub_download(str(path_or_id), filename, **{k: v for k, v in hub_kwargs.items() if k in keys})
        )
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def read_weights(path_or_id: str | os.PathLike, **hub_kwargs: Any) -> dict[str, torch.Tensor]:
    """The weights of a safetensors checkpoint (single file or shards; local folder or Hub id), by key."""
    single = resolve_file(path_or_id, "model.safetensors", **hub_kwargs)
    if single is not None:
        return load_file(str(single))
    index = resolve_file(path_or_id, INDEX_FILE, **hub_kwargs)
    if index is None:
        raise CheckpointError(
            f"{path_or_id}: no model.safetensors or {INDEX_FILE}; a structured checkpoint needs safetensors."
        )
    shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        file = resolve_file(path_or_id, shard, **hub_kwargs)
        if file is None:
            raise CheckpointError(f"{path_or_id}: shard {shard} listed in {INDEX_FILE} is missing.")
        tensors.update(load_file(str(file)))
    return tensors


def _model_class(config: Any) -> type[PreTrainedModel]:
    """The class named in config.architectures, taken only from transformers' own namespace."""
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    return transformers.AutoModel


_HUB_KEYS = ("revision", "cache_dir", "token", "local_files_only", "force_download")


def download(repo_id: str, **hub_kwargs: Any) -> Path:
    """Download (or find in the cache) every file of Hub repository `repo_id`; the local snapshot folder.

    Raises:
        FileNotFoundError: the repository or revision does not exist, or the Hub is offline and it is not cached.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(snapshot_download(repo_id, **{k: v for k, v in hub_kwargs.items() if k in _HUB_KEYS}))
    except RevisionNotFoundError:
        raise FileNotFoundError(
            f"Hub repository {repo_id!r} has no revision {hub_kwargs.get('revision')!r}."
        ) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"Hub repository {repo_id!r} does not exist (or is private without a token)."
        ) from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"Hub repository {repo_id!r} is not in the local cache and the Hub cannot be reached (offline?)."
        ) from None


def from_pretrained(
    path_or_id: str | os.PathLike,
    model_class: type | None = None,
    runtime: str | None = None,
    runtime_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a checkpoint written by `save_pretrained` (local folder or Hub id) with its masks and settings.

    Dense and compact checkpoints load the same way; a Hub id is downloaded into the Hugging Face cache
    first (and found there later, also offline).

    Args:
        path_or_id: Local folder or Hub repository id (``"org/name"``).
        model_class: A transformers class or Auto class; default: the class in ``config.architectures``.
        runtime: ``"sparse"`` packs the sparse Linear layers for fast CPU inference after loading
            (`sparse_nlp.runtime.convert`); None (default) keeps the dense layers.
        runtime_options: With ``runtime="sparse"``, options of `sparse_nlp.runtime.convert`: ``tokens``,
            ``methods``, ``max_density``, ``margin``, ``use_cache``. E.g. ``{"methods": ["native"]}`` keeps no
            dense copy of any packed layer (the autotune cannot then choose the dense product for a token count
            where it is faster), which bounds the memory of the loaded model by its packed size.
        **kwargs: Passed to the class's ``from_pretrained`` (``dtype``, ...); ``revision``, ``cache_dir``,
            ``token``, ``local_files_only`` and ``force_download`` go to the Hub download.
            ``check_hashes=False`` skips the SHA-256 check of the files (see `verify_checkpoint`);
            ``trust_remote_code`` is False unless given as True (a checkpoint that needs its own code is
            refused, never run).

    A local folder that a save replaces while it is being read is loaded again (the new checkpoint), so
    the model never mixes files of two saves.

    Raises:
        FileNotFoundError: a local path that does not exist, or a Hub repository that cannot be found.
        CheckpointError / MetadataError: damaged files or metadata, naming the file.
    """
    name = str(path_or_id)
    if runtime not in (None, "dense", "sparse"):
        raise CheckpointError(f"runtime must be 'sparse' or 'dense' (or None), got {runtime!r}.")
    options = dict(runtime_options or {})
    if options and runtime != "sparse":
        raise CheckpointError("runtime_options apply to runtime='sparse' only.")
    unknown = sorted(set(options) - set(RUNTIME_OPTIONS))
    if unknown:
        raise CheckpointError(
            f"runtime_options: unknown {unknown}; choose from {', '.join(RUNTIME_OPTIONS)} "
            "(see sparse_nlp.runtime.convert)."
        )
    runtime = None if runtime is None else (runtime, options)
    if not _is_local(path_or_id) and not _looks_like_hub_id(name):
        raise FileNotFoundError(
            f"checkpoint folder {name!r} does not exist (and it is not a Hub repository id)."
        )
    return _load_any(path_or_id, model_class, name, kwargs, runtime)


RUNTIME_OPTIONS = ("tokens", "methods", "max_density", "margin", "use_cache")
"""The options of `sparse_nlp.runtime.convert` that ``from_pretrained(..., runtime_options=...)`` passes on."""


def _load_any(
    path_or_id: str | os.PathLike,
    model_class: type | None,
    name: str,
    kwargs: dict[str, Any],
    runtime: tuple[str, dict[str, Any]] | None = None,
) -> PreTrainedModel:
    """A Hub id downloaded and loaded, or a local folder loaded without mixing two saves' files."""
    check_hashes = kwargs.pop("check_hashes", None)
    if not _is_local(path_or_id):
        folder = download(name, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k not in _HUB_KEYS}
        return _load_checked(folder, model_class, name, check_hashes, kwargs, runtime)
    folder = Path(path_or_id)
    for _attempt in range(_OPTIMISTIC_TRIES):  # a save switching the folder in mid-load: load it again
        before = folder_state(folder)
        try:
            model = _load_checked(folder, model_class, name, check_hashes, dict(kwargs), runtime)
        except (OSError, ValueError, RuntimeError, SafetensorError):
            if before is not None and folder_state(folder) == before:
                raise  # the folder did not change: the error is the checkpoint's own
            continue
        if before is not None and folder_state(folder) == before:
            return model
        if before is None:
            break
    with _save_lock(folder, shared=True):  # saves keep coming: wait for the current one, hold the next off
        return _load_checked(folder, model_class, name, check_hashes, dict(kwargs), runtime)


_OPTIMISTIC_TRIES = 3


def _load_checked(
    folder: Path,
    model_class: type | None,
    name: str,
    check_hashes: bool | None,
    kwargs: dict[str, Any],
    runtime: tuple[str, dict[str, Any]] | None = None,
) -> PreTrainedModel:
    """Verify and load one checkpoint folder (the body of `from_pretrained`); `runtime` is (mode, convert
    options)."""
    raw = verify_checkpoint(folder, check_hashes=check_hashes)
    mode, options = runtime if runtime is not None else (None, {})
    packed = _load_packed(folder, raw, model_class, name, kwargs, options) if mode == "sparse" else None
    if packed is not None:
        model = packed
    elif raw is not None and "compact" in raw:
        _uncompact_config(kwargs.get("config"), raw["compact"])
        with expanded(folder) as dense:
            model = _load_folder(dense, model_class, name, **kwargs)
    else:
        model = _load_folder(folder, model_class, name, **kwargs)
    if mode == "sparse" and packed is None:  # loaded dense: pack it now
        convert(model, **options)
    meta = getattr(model.config, METADATA_KEY, None)
    if isinstance(meta, dict):  # facts about the files on disk, not about the model in memory
        for key in ("files", "tokenizer_files", "compact", "sha256", "save_id", "kept_zeros"):
            meta.pop(key, None)
    model.config._name_or_path = name
    return model


def _uncompact_config(config: Any, info: Any) -> None:
    """A config the caller read from a compact folder (e.g. AutoConfig with num_labels) -> as saved."""
    if config is None:
        return
    if getattr(config, "_attn_implementation", None) == ATTN_MARKER:
        config._attn_implementation = info.get("attn_implementation") if isinstance(info, dict) else None
    meta = getattr(config, METADATA_KEY, None)
    if isinstance(meta, dict) and "compact" in meta:
        setattr(config, METADATA_KEY, {k: v for k, v in meta.items() if k != "compact"})


_CONFIG_OVERRIDES = (
    "num_labels",
    "id2label",
    "label2id",
    "problem_type",
    "output_hidden_states",
    "output_attentions",
)


def _remote_code_message(name: str) -> str:
    return (
        f"{name}/config.json: this checkpoint needs its own Python code (auto_map / an unknown model_type); "
        "sparse_nlp never runs code from a checkpoint unless asked: pass trust_remote_code=True "
        "(--trust-remote-code on the command line) only if you trust its author."
    )


def load_config(path_or_id: str | os.PathLike, name: str | None = None, **kwargs: Any) -> Any:
    """``AutoConfig.from_pretrained`` with ``trust_remote_code=False`` unless the caller passes True.

    A checkpoint that needs its own code (an ``auto_map`` for a ``model_type`` transformers does not know)
    is refused with a `CheckpointError` instead of a prompt or an import of its Python files.
    """
    name = name or str(path_or_id)
    kwargs["trust_remote_code"] = kwargs.get("trust_remote_code", False) is True
    try:
        return AutoConfig.from_pretrained(path_or_id, **kwargs)
    except ValueError as err:
        if "trust_remote_code" in str(err) or "auto_map" in str(err):
            raise CheckpointError(_remote_code_message(name)) from None
        if "model_type" in str(err) or "Unrecognized" in str(err):
            raise CheckpointError(
                f"{name}/config.json: transformers does not know this model type "
                f"({str(err).splitlines()[0][:200]})"
            ) from None
        raise


def _prepared_config(
    path_or_id: str | os.PathLike, name: str, kwargs: dict[str, Any], compact: Any = None
) -> tuple[Any, dict[str, Any] | None, bool]:
    """(config, raw sparse_nlp metadata, trust_remote_code) for loading a folder; pops what it uses from `kwargs`.

    `compact` is the ``compact`` metadata of a compact folder read in place (its config is turned into the dense one).
    """
    # config overrides (num_labels, ...) go into the config: transformers refuses them beside config=
    overrides = {k: kwargs.pop(k) for k in _CONFIG_OVERRIDES if k in kwargs}
    trust = kwargs.pop("trust_remote_code", False) is True
    config = kwargs.pop("config", None) or load_config(path_or_id, name, trust_remote_code=trust)
    if compact is not None:
        _uncompact_config(config, compact)
    for key, value in overrides.items():
        setattr(config, key, value)
    try:
        meta = raw_metadata(config)
        read_metadata(config)
    except MetadataError as err:
        raise MetadataError(f"{name}/config.json: {err}") from None
    return config, meta, trust


def _load_folder(folder: Path, model_class: type | None, name: str, **kwargs: Any) -> PreTrainedModel:
    """Load a verified local dense checkpoint folder; `name` is what error messages call it."""
    path_or_id = folder
    config, meta, trust = _prepared_config(path_or_id, name, kwargs)
    cls = model_class or _model_class(config)
    if (
        meta is not None and meta.get("structured") is not None
    ):  # shrunk blocks: rebuilt before the weights are read
        model = load_structured(cls, path_or_id, config, read_weights, **kwargs)
    else:
        try:
            model = cls.from_pretrained(path_or_id, config=config, trust_remote_code=trust, **kwargs)
        except ValueError as err:
            if "trust_remote_code" not in str(err):
                raise
            raise CheckpointError(_remote_code_message(name)) from None
    if meta is not None:
        restore_masks(model, path_or_id, meta)
        sparsity = read_metadata(model.config)
        if sparsity is not None and sparsity.attention is not None:
            apply_attention(model, sparsity.attention)
        if sparsity is not None and sparsity.activation is not None:
            try:
                restore_activation(model, sparsity.activation)
            except MetadataError as err:
                raise MetadataError(f"{name}/{err}") from None
    return model


# ---- load straight into the sparse runtime --------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class _StreamedTensors:
    """The tensors of safetensors files, each read on access with plain file reads into a new tensor.

    No memory map: a mapped file's pages count as the process's memory once touched, which would add the size
    of the file to the peak of a load. Implements `runtime.load.TensorSource`.
    """

    def __init__(self, paths: list[Path], error: type[Exception], what: str) -> None:
        self.where = str(paths[0]) if len(paths) == 1 else f"{paths[0].parent} ({len(paths)} weight files)"
        self.metadata: dict[str, str] = {}
        self._at: dict[str, tuple[Path, int, torch.dtype, tuple[int, ...]]] = {}
        for path in paths:
            if not path.is_file():
                raise CheckpointError(f"{path}: {what} is missing.")
            try:  # the library's own checks of the header first, with the messages of a dense read
                with safe_open(str(path), framework="pt") as f:
                    self.metadata.update(f.metadata() or {})
            except (SafetensorError, OSError, RuntimeError) as err:
                raise error(f"{path}: {what} is damaged ({err}).") from None
            header = check_safetensors(path)
            with open(path, "rb") as f:
                base = 8 + int.from_bytes(f.read(8), "little")
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
                start, end = info["data_offsets"]
                shape = tuple(int(d) for d in info["shape"])
                if dtype is None or end - start != math.prod(shape) * dtype.itemsize:
                    raise error(
                        f"{path}: tensor {key!r} ({info['dtype']}, {list(shape)}) cannot be read here."
                    )
                self._at[key] = (path, base + start, dtype, shape)

    def __getitem__(self, name: str) -> torch.Tensor:
        path, offset, dtype, shape = self._at[name]  # KeyError: the files lack it
        out = torch.empty(shape, dtype=dtype)
        if out.numel():
            buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            with open(path, "rb") as f:
                f.seek(offset)
                if f.readinto(buffer) != len(buffer):
                    raise CheckpointError(f"{path}: tensor {name!r} is cut short; the file is truncated.")
        return out

    def dense_entries(self) -> dict[str, dict[str, Any]]:
        """Header entries (as a compact file's) for every tensor, all stored dense."""
        return {
            k: {"encoding": "dense", "shape": list(shape), "dtype": str(dtype).removeprefix("torch.")}
            for k, (_, _, dtype, shape) in self._at.items()
        }


_PACKED_KWARGS = {"config", "trust_remote_code", "dtype", *_CONFIG_OVERRIDES}


def _load_packed(
    folder: Path,
    raw: dict[str, Any] | None,
    model_class: type | None,
    name: str,
    kwargs: dict[str, Any],
    options: dict[str, Any],
) -> PreTrainedModel | None:
    """`from_pretrained(..., runtime="sparse")` without a dense copy of the model (`runtime.load`), or None where
    that path does not apply (the caller then loads dense and converts)."""
    if set(kwargs) - _PACKED_KWARGS or kwargs.get("trust_remote_code") is True:
        return None
    if kwargs.get("dtype") not in (None, "auto", "float32", torch.float32):
        return None
    if raw is not None and raw.get("structured") is not None:
        return None
    compact = raw.get("compact") if raw is not None and "compact" in raw else None
    if compact is not None:
        _, file = compact_format.dense_config({METADATA_KEY: dict(raw)})
        path = folder / file
        if not path.is_file():
            raise CheckpointError(
                f"{path}: compact weight file is missing (config.json says the checkpoint is compact)."
            )
        source = _StreamedTensors([path], CompactFormatError, "compact weight file")
        source.entries = parse_header(source.metadata.get(HEADER_KEY), str(path))
        decoded = {mask_owner(k, e) for k, e in source.entries.items() if e.get("encoding") != "dense"}
    else:
        files = dense_weight_files(folder)
        if not files:
            return None
        source = _StreamedTensors(files, CheckpointError, "weight file")
        source.entries = source.dense_entries()
        decoded = set()
    kwargs = dict(kwargs)
    kwargs.pop("dtype", None)
    config, meta, _ = _prepared_config(folder, name, kwargs, compact)
    sparsity = read_metadata(config)
    if sparsity is not None and sparsity.activation is not None:
        return None  # activation sparsity is restored on the dense model, before conversion
    mask_path = folder / MASKS_FILE
    file_masks = load_packed_masks(mask_path) if mask_path.is_file() else {}  # unpacked layer by layer
    names = list((meta or {}).get("masked_modules", []))
    unlisted = sorted((set(file_masks) | decoded) - set(names))
    if unlisted:
        raise CheckpointError(
            f"{mask_path if file_masks else source.where}: holds masks for {unlisted[:3]}, which config.json "
            f"({METADATA_KEY}.masked_modules) does not list; the list was shortened or the files come from "
            "different saves."
        )
    cls = model_class or _model_class(config)
    with init_empty_weights():
        build = getattr(cls, "_from_config", None)
        model = build(config) if build is not None else cls.from_config(config)
    model.tie_weights()  # tied tensors share one Parameter (outside the context, which would copy it on assignment)
    module_names = {id(m): n for n, m in model.named_modules()}
    masked = {}
    for rel in names:
        try:
            masked[rel] = module_names[id(resolve_module(model, rel))]
        except KeyError:
            return None  # a fused-expert parameter or a module this model lacks: the dense path reports it
    plan, reason = plan_load(model, source.entries, masked)
    if plan is None:
        logger.info("%s: loading dense, then converting (%s)", name, reason)
        return None
    recorded_zeros = (meta or {}).get("kept_zeros")
    has_masks = bool(file_masks or decoded)

    def check(rel: str, weight: torch.Tensor, decoded_mask: torch.Tensor | None) -> torch.Tensor:
        if rel in file_masks:
            mask, where = unpack_bits(*file_masks.pop(rel)), mask_path
        elif decoded_mask is not None:
            mask, where = decoded_mask, source.where
        elif not has_masks:
            mask, where = weight != 0, folder
        else:
            raise CheckpointError(f"{mask_path}: no mask for {rel!r}, which config.json lists as masked.")
        _verify_mask(rel, weight, mask, where, folder, recorded_zeros)
        return mask

    load_packed(model, source, plan, check, pack=convert, **options)
    model.eval()
    if model.can_generate() and (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    if sparsity is not None and sparsity.attention is not None:
        apply_attention(model, sparsity.attention)
    return model


def restore_masks(
    model: nn.Module, path_or_id: str | os.PathLike, meta: dict[str, Any], **hub_kwargs: Any
) -> None:
    """Attach the masks a checkpoint records: from the mask file, or (without one) from the zeros in the weights."""
    names = meta.get("masked_modules", [])
    mask_path = resolve_file(path_or_id, MASKS_FILE, **hub_kwargs)
    masks = load_masks(mask_path) if mask_path is not None else None
    unlisted = sorted(set(masks or {}) - set(names))
    if unlisted:
        raise CheckpointError(
            f"{mask_path}: holds masks for {unlisted[:3]}, which config.json ({METADATA_KEY}.masked_modules) "
            "does not list; the list was shortened or the files come from different saves."
        )
    recorded_zeros = meta.get("kept_zeros")
    if masks is None and names:
        logger.info("%s has no %s; taking masks from the zeros of the weights", path_or_id, MASKS_FILE)
    for rel in names:
        try:
            module = resolve_module(model, rel)
            param_name = None
        except KeyError:
            module, param_name = _expert_owner(model, rel)
        if module is None:
            raise CheckpointError(
                f"{path_or_id}/config.json lists masked module {rel!r}, which {type(model).__name__} does not have."
            ) from None
        weight = module.weight if param_name is None else module._parameters[param_name]
        if masks is None:
            mask = weight.detach() != 0
        elif rel not in masks:
            raise CheckpointError(f"{mask_path}: no mask for {rel!r}, which config.json lists as masked.")
        else:
            mask = masks[rel]
        _verify_mask(
            rel, weight, mask, mask_path or path_or_id, path_or_id, recorded_zeros, param_name is None
        )
        if param_name is None:
            attach_mask(module, mask)
        else:
            attach_expert_mask(module, param_name, mask)


def _verify_mask(
    rel: str,
    weight: torch.Tensor,
    mask: torch.Tensor,
    mask_where: Any,
    path_or_id: Any,
    recorded_zeros: dict[str, int] | None,
    count_zeros: bool = True,
) -> None:
    """Raise `CheckpointError` when a mask does not fit its weight (shape, nonzero pruned weights, flipped bits)."""
    if tuple(mask.shape) != tuple(weight.shape):
        raise CheckpointError(
            f"{mask_where}: mask of {rel!r} has shape {tuple(mask.shape)} but the weight has "
            f"{tuple(weight.shape)}; the checkpoint files disagree."
        )
    keep = mask.to(device=weight.device, dtype=torch.bool)
    nonzero = (
        weight.detach() != 0
    )  # +0.0 and -0.0 are zero; bool temporaries only (a load checks layer by layer)
    # count_nonzero, not sum: a bool sum makes an int64 copy of the whole tensor first
    kept_nonzero = int(torch.count_nonzero(nonzero.logical_and_(keep)))
    stray = int(torch.count_nonzero(weight.detach())) - kept_nonzero
    del nonzero
    if stray:
        raise CheckpointError(
            f"{path_or_id}: {rel!r} has {stray} nonzero weights where its mask says pruned; "
            "the weights and the mask file come from different saves."
        )
    if recorded_zeros is not None and count_zeros:  # recorded since the integrity checks
        zeros = int(torch.count_nonzero(keep)) - kept_nonzero
        if zeros > recorded_zeros.get(rel, 0):
            raise CheckpointError(
                f"{mask_where}: the mask of {rel!r} keeps {zeros} weights that are 0.0 but the "
                f"save recorded {recorded_zeros.get(rel, 0)} ({METADATA_KEY}.kept_zeros); a mask bit was "
                "flipped from pruned to kept (such a weight could grow back in fine-tuning)."
            )


def _expert_owner(model: nn.Module, rel: str) -> tuple[nn.Module | None, str | None]:
    """(module, parameter name) of a masked fused-expert parameter name, or (None, None)."""
    owner, _, param_name = rel.rpartition(".")
    try:
        module = resolve_module(model, owner)
    except KeyError:
        return None, None
    return (module, param_name) if param_name in module._parameters else (None, None)


__all__ = [
    "COMPACT_FILE",
    "CheckpointError",
    "CompactFormatError",
    "METADATA_KEY",
    "MetadataError",
    "compact_checkpoint",
    "download",
    "file_sha256",
    "folder_state",
    "from_pretrained",
    "read_lock",
    "recover",
    "is_compact",
    "save_pretrained",
    "verify_checkpoint",
]
