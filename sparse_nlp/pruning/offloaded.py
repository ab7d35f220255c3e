"""Where a model keeps its block store when its blocks live on disk (sequential onloading).

The store itself is `sparse_nlp.pruning.onloading.BlockStore`; this module only names the attribute that
holds it and walks a model's modules with each block brought into memory in turn, so that saving
(`sparse_nlp.checkpoint`) and reporting (`sparse_nlp.report`) can handle an offloaded model without
importing the onloading machinery (which imports model loading, which imports the checkpoint code).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn

STORE_ATTR = "_sparse_nlp_block_store"
"""Key in ``model.__dict__`` of the `BlockStore` of a model whose blocks live on disk."""


def block_store(model: nn.Module) -> Any:
    """The block store attached to `model` (by ``load_offloaded`` or ``sparsify(..., offload_dir=...)``), or None."""
    return getattr(model, "__dict__", {}).get(STORE_ATTR)


def named_modules_onloaded(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()``, with each offloaded block in memory while its modules are yielded.

    A block that was on disk is brought in when the walk reaches it and freed (not rewritten) when the walk
    leaves it, so at most one such block is in memory at a time. Without a store this is ``named_modules``.
    """
    store = block_store(model)
    if store is None:
        yield from model.named_modules()
        return
    current: int | None = None
    release = False
    try:
        for name, module in model.named_modules():
            index = store.block_of(name)
            if index != current:
                if current is not None and release:
                    store.offload(current, write=False)
                current, release = index, False
                if index is not None:
                    release = not store.is_loaded(index)
                    store.onload(index)
            yield name, module
    finally:
        if current is not None and release:
            store.offload(current, write=False)
