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

Saves go to a temporary folder first and are moved into place at the end, so a failed save leaves no
half-written checkpoint behind. The metadata lists every file of the checkpoint with its size
(``sparse_nlp.files``), so a truncated, missing or swapped file is reported by name on load, before any
weight is read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from .attention.apply import apply_attention
from .errors import CheckpointError, CompactFormatError, MetadataError
from .formats import compact as compact_format
from .formats.compact import ATTN_MARKER, HEADER_KEY, is_compact, nonzero_entries
from .formats.manifest import (
    COMPACT_FILE,
    CONFIG_FILE,
    INDEX_FILE,
    MASKS_FILE,
    METADATA_KEY,
    OUR_FILES,
    listed_files,
    safetensors_problem,
    with_manifest,
)
from .formats.masks import decode_masks, encode_masks
from .metadata import raw_metadata, read_metadata, write_metadata
from .pruning.experts import attach_expert_mask, masked_experts
from .pruning.masking import attach_mask, masked_modules
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
        base_relative_name(model, name): module._buffers["weight_mask"]
        for name, module in masked_modules(model)
    }
    masks.update((base_relative_name(model, name), mask) for name, _, _, mask in masked_experts(model))
    return write_masks(masks, path)


def load_masks(path: Path) -> dict[str, torch.Tensor]:
    """Read a mask file written by `write_masks`: bool masks by base-relative module name."""
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
        return decode_masks(packed, shapes)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None


# ---- damaged files ---------------------------------------------------------------------------------------


def check_safetensors(path: Path) -> None:
    """Raise `CheckpointError` naming `path` when its header is unreadable or the file is shorter/longer than it says."""
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
    problem = safetensors_problem(size, n, header)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")


def verify_checkpoint(folder: str | os.PathLike) -> dict[str, Any] | None:
    """Check a local checkpoint folder before loading it: config.json, listed files and their sizes, weight headers.

    Returns the raw ``sparse_nlp`` metadata dict (None for a plain checkpoint).

    Raises:
        CheckpointError: a missing, truncated or damaged file (named in the message).
        MetadataError: malformed metadata or a format version newer than this sparse_nlp.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{config_path}: missing; is {str(folder)!r} a model folder saved with save_pretrained?"
        )
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err}).") from None
    meta = raw.get(METADATA_KEY) if isinstance(raw, dict) else None
    if meta is not None:
        try:
            raw_metadata(SimpleNamespace(**{METADATA_KEY: meta}))
        except MetadataError as err:
            raise MetadataError(f"{config_path}: {err}") from None
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

    Args:
        model: A model sparsified by `sparse_nlp.sparsify` (a plain model is saved as a plain checkpoint).
        save_directory: Output folder; created if needed. Files of an earlier save there are replaced.
        tokenizer: Saved beside the model when given.
        compact: Write the compact format (`sparse_nlp.compact`): smaller on disk, loadable only through
            `sparse_nlp.from_pretrained`. Needs a sparsified model.
        **kwargs: Passed to ``model.save_pretrained`` (e.g. ``max_shard_size``).

    Returns:
        The output folder.
    """
    out = Path(save_directory)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"cannot save to {str(out)!r}: it exists and is not a folder.")
    config = read_metadata(model.config)
    if config is not None:
        write_metadata(model, config)  # refresh the list of masked modules
    elif compact:
        raise CheckpointError(
            "compact=True needs a model sparsified by sparse_nlp (its config has no sparse_nlp metadata)."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, **kwargs)
        tokenizer_files = []
        if tokenizer is not None:
            before = {p.name for p in tmp.iterdir()}
            tokenizer.save_pretrained(tmp)
            tokenizer_files = sorted({p.name for p in tmp.iterdir()} - before)
        if config is not None:
            save_masks(model, tmp / MASKS_FILE)
            (tmp / CONFIG_FILE).write_text(config.to_json() + "\n")
            if compact:
                compact_folder(tmp)
            _write_manifest(tmp, tokenizer_files)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved sparse checkpoint to %s", out)
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Move a finished checkpoint from `tmp` into `out`, removing weight files of an earlier save there."""
    out.mkdir(exist_ok=True)
    for stale in [*OUR_FILES, *(p.name for p in out.glob("model*.safetensors"))]:
        if (out / stale).exists() and not (tmp / stale).exists():
            (out / stale).unlink()
    for item in tmp.iterdir():
        target = out / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(item, target)


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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for item in src.iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
        compact_folder(tmp)
        _write_manifest(tmp, list(meta.get("tokenizer_files") or []))
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_manifest(folder: Path, tokenizer_files: list[str]) -> None:
    """Record every file of the checkpoint and its size in config.json, so damage is named on load."""
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    sizes = {
        p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != "config.json"
    }
    raw[METADATA_KEY] = with_manifest(raw[METADATA_KEY], sizes, tokenizer_files)
    _write_json(path, raw)


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
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a checkpoint written by `save_pretrained` (local folder or Hub id) with its masks and settings.

    Dense and compact checkpoints load the same way; a Hub id is downloaded into the Hugging Face cache
    first (and found there later, also offline).

    Args:
        path_or_id: Local folder or Hub repository id (``"org/name"``).
        model_class: A transformers class or Auto class; default: the class in ``config.architectures``.
        **kwargs: Passed to the class's ``from_pretrained`` (``dtype``, ...); ``revision``, ``cache_dir``,
            ``token``, ``local_files_only`` and ``force_download`` go to the Hub download.

    Raises:
        FileNotFoundError: a local path that does not exist, or a Hub repository that cannot be found.
        CheckpointError / MetadataError: damaged files or metadata, naming the file.
    """
    name = str(path_or_id)
    if not _is_local(path_or_id) and not _looks_like_hub_id(name):
        raise FileNotFoundError(
            f"checkpoint folder {name!r} does not exist (and it is not a Hub repository id)."
        )
    if _is_local(path_or_id):
        folder = Path(path_or_id)
    else:
        folder = download(name, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k not in _HUB_KEYS}
    raw = verify_checkpoint(folder)
    if raw is not None and "compact" in raw:
        _uncompact_config(kwargs.get("config"), raw["compact"])
        with expanded(folder) as dense:
            model = _load_folder(dense, model_class, name, **kwargs)
    else:
        model = _load_folder(folder, model_class, name, **kwargs)
    meta = getattr(model.config, METADATA_KEY, None)
    if isinstance(meta, dict):  # facts about the files on disk, not about the model in memory
        for key in ("files", "tokenizer_files", "compact"):
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


def _load_folder(folder: Path, model_class: type | None, name: str, **kwargs: Any) -> PreTrainedModel:
    """Load a verified local dense checkpoint folder; `name` is what error messages call it."""
    path_or_id = folder
    # config overrides (num_labels, ...) go into the config: transformers refuses them beside config=
    overrides = {k: kwargs.pop(k) for k in _CONFIG_OVERRIDES if k in kwargs}
    trust = kwargs.pop("trust_remote_code", False) is True
    config = kwargs.pop("config", None) or load_config(path_or_id, name, trust_remote_code=trust)
    for key, value in overrides.items():
        setattr(config, key, value)
    try:
        meta = raw_metadata(config)
        read_metadata(config)
    except MetadataError as err:
        raise MetadataError(f"{name}/config.json: {err}") from None
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
    return model


def restore_masks(
    model: nn.Module, path_or_id: str | os.PathLike, meta: dict[str, Any], **hub_kwargs: Any
) -> None:
    """Attach the masks a checkpoint records: from the mask file, or (without one) from the zeros in the weights."""
    names = meta.get("masked_modules", [])
    mask_path = resolve_file(path_or_id, MASKS_FILE, **hub_kwargs)
    masks = load_masks(mask_path) if mask_path is not None else None
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
        if tuple(mask.shape) != tuple(weight.shape):
            raise CheckpointError(
                f"{mask_path or path_or_id}: mask of {rel!r} has shape {tuple(mask.shape)} but the weight has "
                f"{tuple(weight.shape)}; the checkpoint files disagree."
            )
        stray = int(nonzero_entries(weight)[~mask.cpu().numpy()].sum())
        if stray:
            raise CheckpointError(
                f"{path_or_id}: {rel!r} has {stray} nonzero weights where its mask says pruned; "
                "the weights and the mask file come from different saves."
            )
        if param_name is None:
            attach_mask(module, mask)
        else:
            attach_expert_mask(module, param_name, mask)


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
    "from_pretrained",
    "is_compact",
    "save_pretrained",
    "verify_checkpoint",
]
