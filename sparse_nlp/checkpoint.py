"""Save and load sparse models so that `from_pretrained` gives back exactly the same model.

A sparse checkpoint is a normal transformers checkpoint (DESIGN.md, decision 4):

- ``model.safetensors`` (dense, pruned entries exactly 0.0) and ``config.json`` with our metadata under
  the ``sparse_nlp`` key, which plain ``AutoModel.from_pretrained`` loads as an ordinary model;
- ``sparse_masks.safetensors``: each mask as packed bits (uint8), so masks come back exactly even where a
  kept weight happens to be 0.0;
- ``sparsity_config.json``: the `SparsityConfig` (the recipe) beside the model, for people and tools.

Saves go to a temporary folder first and are moved into place at the end, so a failed save leaves no
half-written checkpoint behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from .metadata import METADATA_KEY, MetadataError, raw_metadata, read_metadata, write_metadata
from .pruning.masking import attach_mask, masked_modules
from .targets import base_relative_name, resolve_module

logger = logging.getLogger(__name__)

MASKS_FILE = "sparse_masks.safetensors"
CONFIG_FILE = "sparsity_config.json"
_OUR_FILES = (MASKS_FILE, CONFIG_FILE)


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, or disagrees with its own metadata (the message names the file)."""


# ---- masks as packed bits ----------------------------------------------------------------------------


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask -> uint8 tensor of packed bits (8 entries per byte, big-endian bit order, row-major)."""
    return torch.from_numpy(np.packbits(mask.detach().cpu().numpy().reshape(-1)))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    count = int(np.prod(shape))
    bits = np.unpackbits(packed.numpy(), count=count)
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


def save_masks(model: nn.Module, path: Path) -> int:
    tensors, shapes = {}, {}
    for name, module in masked_modules(model):
        key = base_relative_name(model, name)
        tensors[key] = pack_mask(module._buffers["weight_mask"])
        shapes[key] = list(module._buffers["weight_mask"].shape)
    if tensors:
        save_file(tensors, str(path), metadata={"format": "sparse_nlp.packed_bits", "shapes": json.dumps(shapes)})
    return len(tensors)


def load_masks(path: Path) -> dict[str, torch.Tensor]:
    try:
        packed = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        shapes = json.loads(header["shapes"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError, RuntimeError) as err:
        raise CheckpointError(f"{path}: mask file is damaged or not a sparse_nlp mask file ({err}).") from None
    missing = sorted(set(packed) ^ set(shapes))
    if missing:
        raise CheckpointError(f"{path}: masks and their recorded shapes disagree for {missing}.")
    return {k: unpack_mask(v, tuple(shapes[k])) for k, v in packed.items()}


# ---- save ----------------------------------------------------------------------------------------------


def save_pretrained(
    model: PreTrainedModel,
    save_directory: str | os.PathLike,
    *,
    tokenizer: Any = None,
    **kwargs: Any,
) -> Path:
    """Write `model` (and optionally its tokenizer) as a sparse checkpoint that `from_pretrained` restores exactly.

    Args:
        model: A model sparsified by `sparse_nlp.sparsify` (a plain model is saved as a plain checkpoint).
        save_directory: Output folder; created if needed. Files of an earlier save there are replaced.
        tokenizer: Saved beside the model when given.
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if config is not None:
            save_masks(model, tmp / MASKS_FILE)
            (tmp / CONFIG_FILE).write_text(config.to_json() + "\n")
        out.mkdir(exist_ok=True)
        for stale in _OUR_FILES:
            if (out / stale).exists() and not (tmp / stale).exists():
                (out / stale).unlink()
        for item in tmp.iterdir():
            target = out / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved sparse checkpoint to %s", out)
    return out


# ---- load ----------------------------------------------------------------------------------------------


def _is_local(path: str | os.PathLike) -> bool:
    return Path(path).exists()


def _looks_like_hub_id(name: str) -> bool:
    parts = str(name).split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not str(name).startswith((".", "/", "~")) and "\\" not in str(name)


def resolve_file(path_or_id: str | os.PathLike, filename: str, **hub_kwargs: Any) -> Path | None:
    """A file of a local folder or a Hub repository (downloaded to the cache), or None when it has none."""
    if _is_local(path_or_id):
        candidate = Path(path_or_id) / filename
        return candidate if candidate.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    keys = ("revision", "cache_dir", "token", "local_files_only", "force_download")
    try:
        return Path(hf_hub_download(str(path_or_id), filename, **{k: v for k, v in hub_kwargs.items() if k in keys}))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def _model_class(config: Any) -> type[PreTrainedModel]:
    """The class named in config.architectures, taken only from transformers' own namespace."""
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    return transformers.AutoModel


def from_pretrained(
    path_or_id: str | os.PathLike,
    model_class: type | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a checkpoint written by `save_pretrained` (local folder or Hub id) with its masks and settings.

    Args:
        path_or_id: Local folder or Hub repository id.
        model_class: A transformers class or Auto class; default: the class in ``config.architectures``.
        **kwargs: Passed to the class's ``from_pretrained`` (``revision``, ``dtype``, ...).

    Raises:
        FileNotFoundError: a local path that does not exist.
        CheckpointError / MetadataError: damaged files or metadata, naming the file.
    """
    name = str(path_or_id)
    if not _is_local(path_or_id) and not _looks_like_hub_id(name):
        raise FileNotFoundError(f"checkpoint folder {name!r} does not exist (and it is not a Hub repository id).")
    if _is_local(path_or_id) and not (Path(path_or_id) / "config.json").is_file():
        raise CheckpointError(f"{name!r} has no config.json; is it a model folder saved with save_pretrained?")
    hub_kwargs = {k: v for k, v in kwargs.items() if k in ("revision", "cache_dir", "token", "local_files_only")}
    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path_or_id, **hub_kwargs)
    try:
        meta = raw_metadata(config)
        read_metadata(config)
    except MetadataError as err:
        raise MetadataError(f"{name}/config.json: {err}") from None
    cls = model_class or _model_class(config)
    model = cls.from_pretrained(path_or_id, config=config, **kwargs)
    if meta is not None:
        restore_masks(model, path_or_id, meta, **hub_kwargs)
        sparsity = read_metadata(model.config)
        if sparsity is not None and sparsity.attention is not None:
            from .attention.apply import apply_attention

            apply_attention(model, sparsity.attention)
    return model


def restore_masks(model: nn.Module, path_or_id: str | os.PathLike, meta: dict[str, Any], **hub_kwargs: Any) -> None:
    """Attach the masks a checkpoint records: from the mask file, or (without one) from the zeros in the weights."""
    names = meta.get("masked_modules", [])
    mask_path = resolve_file(path_or_id, MASKS_FILE, **hub_kwargs)
    masks = load_masks(mask_path) if mask_path is not None else None
    if masks is None and names:
        logger.info("%s has no %s; taking masks from the zeros of the weights", path_or_id, MASKS_FILE)
    for rel in names:
        try:
            module = resolve_module(model, rel)
        except KeyError:
            raise CheckpointError(
                f"{path_or_id}/config.json lists masked module {rel!r}, which {type(model).__name__} does not have."
            ) from None
        if masks is None:
            mask = module.weight.detach() != 0
        elif rel not in masks:
            raise CheckpointError(f"{mask_path}: no mask for {rel!r}, which config.json lists as masked.")
        else:
            mask = masks[rel]
        if tuple(mask.shape) != tuple(module.weight.shape):
            raise CheckpointError(
                f"{mask_path or path_or_id}: mask of {rel!r} has shape {tuple(mask.shape)} but the weight has "
                f"{tuple(module.weight.shape)}; the checkpoint files disagree."
            )
        stray = int((module.weight.detach()[~mask.to(module.weight.device)] != 0).sum())
        if stray:
            raise CheckpointError(
                f"{path_or_id}: {rel!r} has {stray} nonzero weights where its mask says pruned; "
                "the weights and the mask file come from different saves."
            )
        attach_mask(module, mask)


__all__ = ["CheckpointError", "MetadataError", "METADATA_KEY", "from_pretrained", "save_pretrained"]
