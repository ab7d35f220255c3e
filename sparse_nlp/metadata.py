"""Our metadata under one key (``sparse_nlp``) of the model's config, so config.json carries it.

Layout of ``config.sparse_nlp`` (a plain dict, written to config.json by ``save_pretrained``)::

    {
      "format_version": 1,               # FORMAT_VERSION of the writer; newer ones are refused on load
      "library_version": "0.1.0",
      "config": {...},                   # SparsityConfig.to_dict()
      "masked_modules": ["encoder.layer.0.intermediate.dense", ...],   # base-model-relative names
      ...                                # parts add their own keys (structured shapes, attention)
    }
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import FORMAT_VERSION, SparsityConfig
from .errors import ConfigError, MetadataError
from .formats.manifest import METADATA_KEY
from .pruning.experts import expert_names
from .pruning.masking import masked_modules
from .targets import base_relative_name
from .version import __version__


def raw_metadata(config: Any) -> dict[str, Any] | None:
    """The raw ``sparse_nlp`` dict of a transformers config, checked for shape and version; None if absent."""
    meta = getattr(config, METADATA_KEY, None)
    if meta is None:
        return None
    where = f"config.json key {METADATA_KEY!r}"
    if not isinstance(meta, dict):
        raise MetadataError(f"{where} must be a JSON object, got {type(meta).__name__}: {meta!r:.80}.")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise MetadataError(
            f"{where} has no integer 'format_version' (got {version!r}); the metadata is damaged."
        )
    if version > FORMAT_VERSION:
        raise MetadataError(
            f"{where} has format_version {version}, newer than this sparse_nlp understands (<= {FORMAT_VERSION}). "
            "Upgrade sparse_nlp: pip install -U sparse-nlp."
        )
    if not isinstance(meta.get("config"), dict):
        raise MetadataError(
            f"{where}.config must be a JSON object with the sparsity config, got {meta.get('config')!r:.80}."
        )
    modules = meta.get("masked_modules", [])
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise MetadataError(f"{where}.masked_modules must be a list of module names, got {modules!r:.80}.")
    return meta


def read_metadata(config: Any) -> SparsityConfig | None:
    """The `SparsityConfig` recorded on a transformers config, or None for a plain model."""
    meta = raw_metadata(config)
    if meta is None:
        return None
    try:
        return SparsityConfig.from_dict(meta["config"])
    except ConfigError as err:
        raise MetadataError(f"config.json key {METADATA_KEY!r}.config is invalid: {err}") from None


def write_metadata(model: nn.Module, config: SparsityConfig, **extra: Any) -> dict[str, Any]:
    """Record `config` and the current masks on ``model.config`` (kept keys of other parts survive)."""
    old = getattr(model.config, METADATA_KEY, None)
    meta = dict(old) if isinstance(old, dict) else {}
    meta.update(
        format_version=FORMAT_VERSION,
        library_version=__version__,
        config=config.to_dict(),
        # Linear modules by name, then fused expert parameters by parameter name (mixture-of-experts)
        masked_modules=[base_relative_name(model, n) for n, _ in masked_modules(model, derived=True)]
        + expert_names(model),
    )
    meta.update(extra)
    setattr(model.config, METADATA_KEY, meta)
    return meta
