"""The per-layer shape record of a structurally pruned model, and the loader that rebuilds it.

transformers 5 can express only a uniform FFN width (``intermediate_size``); per-layer widths and removed
heads live in our metadata, under ``config.sparse_nlp["structured"]``::

    {"version": 1, "layers": [{"heads": 8, "kv_heads": 8, "head_dim": 32, "ffn": 700}, ...]}

`load_structured` builds the model from its config, shrinks every block to the recorded sizes (before any
weight is read), then reads the safetensors weights strictly: every tensor must fit and none may be missing,
so the logits are bit-identical to the saved model's.

Plain transformers, which does not know this record, sees the original sizes in config.json and refuses
the checkpoint with a size-mismatch error (checked on transformers 5.24) - unless the shrink is a uniform
FFN width, which `sparse_nlp.structured.removal.sync_config` writes into config.json so plain loading
gives the same model.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import SparsityConfig
from ..errors import CheckpointError, StructuredError
from ..metadata import METADATA_KEY, read_metadata, write_metadata
from .removal import keep_ffn, keep_heads, model_layout

RECORD_KEY = "structured"
RECORD_VERSION = 1


def shape_record(model: nn.Module) -> dict[str, Any]:
    """The current per-layer unit counts of `model`, as stored in our metadata."""
    return {
        "version": RECORD_VERSION,
        "layers": [
            {"heads": lay.num_heads, "kv_heads": lay.num_kv_heads, "head_dim": lay.head_dim, "ffn": lay.ffn}
            for lay in model_layout(model)
        ],
    }


def record_shapes(model: nn.Module, structured: Any = None) -> dict[str, Any]:
    """Write the shape record into ``model.config.sparse_nlp`` (creating our metadata if needed).

    Args:
        model: A (possibly) structurally pruned model.
        structured: The `StructuredSparsity` applied, recorded in the config when it records none yet.
    """
    config = read_metadata(model.config) or SparsityConfig()
    if structured is not None and config.structured is None:
        config.structured = structured
    record = shape_record(model)
    write_metadata(model, config, **{RECORD_KEY: record})
    return record


def _check_record(record: Any, where: str) -> list[dict[str, int]]:
    if not isinstance(record, dict) or not isinstance(record.get("layers"), list):
        raise StructuredError(
            f"{where}: the structured shape record must be an object with a 'layers' list, got {record!r:.80}."
        )
    if record.get("version", RECORD_VERSION) > RECORD_VERSION:
        raise StructuredError(
            f"{where}: structured shape record version {record['version']} is newer than this sparse_nlp reads."
        )
    for i, layer in enumerate(record["layers"]):
        if not isinstance(layer, dict) or not all(
            isinstance(layer.get(k), int) and layer[k] >= 0 for k in ("heads", "kv_heads", "ffn")
        ):
            raise StructuredError(
                f"{where}: layers[{i}] needs non-negative integers heads, kv_heads, ffn; got {layer!r}."
            )
    return record["layers"]


def rebuild_shapes(model: nn.Module, record: dict[str, Any], where: str = "structured record") -> None:
    """Shrink a freshly built model to the sizes in `record` (weights are to be loaded afterwards)."""
    layers = _check_record(record, where)
    layouts = model_layout(model)
    if len(layers) != len(layouts):
        raise StructuredError(f"{where}: records {len(layers)} layers but the model has {len(layouts)}.")
    for lay, want in zip(layouts, layers):
        units = want["kv_heads"]
        if (
            units > lay.head_units
            or want["ffn"] > lay.ffn
            or (units and want["heads"] // units != lay.group_size)
        ):
            raise StructuredError(
                f"{where}: layer {lay.index} records {want} but the model config builds {lay}."
            )
        keep_heads(model, lay.index, range(units))
        keep_ffn(model, lay.index, range(want["ffn"]))


def load_structured(
    cls: Any,
    path_or_id: str | os.PathLike,
    config: Any,
    read_weights: Callable[..., dict[str, torch.Tensor]],
    **kwargs: Any,
) -> nn.Module:
    """Build `cls` from `config`, shrink it to the recorded shapes, then load the weights strictly.

    Args:
        cls: A transformers model class or Auto class.
        path_or_id: Checkpoint folder or Hub id.
        config: Its config (with our metadata).
        read_weights: ``read_weights(path_or_id, **hub_options)`` -> the state dict stored there
            (`sparse_nlp.checkpoint.read_weights`; the checkpoint module does the file work).
        **kwargs: ``dtype``, ``attn_implementation``, Hub options, and config overrides (e.g. ``num_labels``).

    Raises:
        CheckpointError: a weight missing, unexpected or of the wrong shape for the recorded layout.
    """
    hub_kwargs = {
        k: kwargs.pop(k)
        for k in ("revision", "cache_dir", "token", "local_files_only", "force_download")
        if k in kwargs
    }
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
    build: dict[str, Any] = {}
    if "attn_implementation" in kwargs:
        build["attn_implementation"] = kwargs.pop("attn_implementation")
    for key in list(kwargs):
        if hasattr(config, key) or key in ("num_labels", "id2label", "label2id"):
            setattr(config, key, kwargs.pop(key))
    if kwargs:
        raise TypeError(
            f"unsupported keyword arguments for a structured checkpoint: {', '.join(sorted(kwargs))}."
        )
    record = getattr(config, METADATA_KEY)[RECORD_KEY]
    build_fn = getattr(cls, "from_config", None) or cls._from_config  # Auto classes / model classes
    model = build_fn(config, **build)
    rebuild_shapes(model, record, f"{path_or_id}/config.json")
    state = read_weights(path_or_id, **hub_kwargs)
    own = model.state_dict()
    wrong = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if wrong:
        raise CheckpointError(
            f"{path_or_id}: weights do not fit the recorded structured shapes: {'; '.join(wrong[:5])}."
        )
    result = model.load_state_dict(state, strict=False)
    loaded = {id(p) for k, p in model.named_parameters(remove_duplicate=False) if k in state}
    missing = [k for k in result.missing_keys if not _is_tied(model, k, loaded)]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{path_or_id}: structured checkpoint does not match its model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}."
        )
    if dtype is not None and dtype != "auto":
        model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    model.eval()
    return model


def _is_tied(model: nn.Module, key: str, loaded: set[int]) -> bool:
    """Whether a missing key is a parameter shared with one that was loaded (tied embeddings) or a buffer."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if key in params:
        return id(params[key]) in loaded
    return True  # a buffer the checkpoint does not store (e.g. position ids); the model builds it
