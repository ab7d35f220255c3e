"""Sequential onloading: prune a model whose blocks stay on disk, one block in memory at a time.

A `BlockStore` keeps each repeated block's tensors (weights, buffers, masks) in a safetensors file of its own,
``block_<i>.safetensors`` in an offload folder, while the block's parameters in the model sit on the ``meta``
device (no memory). The calibration pass (`sparse_nlp.pruning.calibration`) brings block *i* in (`onload`),
gathers its statistics, prunes it, turns the stored activations into block *i+1*'s inputs and writes the
pruned block back out (`offload`) before it touches block *i+1*. Peak memory is then the layers outside the
blocks (embeddings, final norm, head) plus one block plus the calibration activations, whatever the depth.

The arithmetic is the in-memory pass's, on the same tensors read back exactly from safetensors, so the
pruned weights and masks are bit for bit those of ``sparsify`` without offloading. `sparse_nlp.save_pretrained`
saves such a model block by block from the offload folder (`sparse_nlp.checkpoint`), never whole in memory.

Two ways in:

- `load_offloaded(path)` builds the model with empty (``meta``) block parameters and reads only the layers
  outside the blocks from the checkpoint; blocks are read from the checkpoint's own safetensors files when
  first needed. The whole model is never in memory.
- ``sparsify(model, config, offload_dir=...)`` on a model already in memory writes its blocks out first
  and frees them (useful to check the mechanism; it cannot lower the memory the model took to load).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError
from ..models import load_tokenizer, resolve_model
from ..targets import layer_index, model_targets
from .calibration import _blocks
from .masking import MASK_BUFFER, attach_mask, detach_mask
from .offloaded import STORE_ATTR, block_store

logger = logging.getLogger(__name__)

__all__ = ["STORE_ATTR", "BlockStore", "attach_store", "block_store", "load_offloaded", "onload_all"]
MMAP_THRESHOLD = 1 << 20
"""Allocations from this size (bytes) get their own memory map while a store is in use (glibc only)."""


def _return_freed_memory_to_the_system() -> None:
    """Make freed blocks leave the process (glibc): big allocations as their own maps, and trim the heap.

    glibc raises its mmap threshold after large frees, so the next blocks' tensors would come from the heap,
    interleaved with activations, and freed blocks would stay resident. A fixed threshold keeps every tensor
    of 1 MiB or more in its own map, returned to the system when freed; ``malloc_trim`` releases the rest.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer `name` (dotted, relative to `module`) by `value`, keeping its kind."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(
            value, requires_grad=old.requires_grad if old is not None else False
        )
    else:
        owner._buffers[leaf] = value


class BlockStore:
    """The blocks of `model` kept on disk in `folder`, one safetensors file per block (see the module docstring).

    Args:
        model: The model whose repeated blocks (``model_targets(model).layers``) are stored.
        folder: Offload folder; created if needed. Files of an earlier run there are overwritten.
        source: Optional ``{block index: (safetensors file, key prefix)}`` to read a block from before it was
            first written to `folder` (a model loaded by `load_offloaded`).
    """

    def __init__(
        self,
        model: nn.Module,
        folder: str | os.PathLike,
        source: dict[int, tuple[list[Path], str]] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.blocks = _blocks(model)
        self.prefix = _full_blocks_name(model)
        """Dotted name of the block list in `model` (``model.layers``): block i's modules are ``<prefix>.<i>.*``."""
        self.source = dict(source or {})
        self.written: set[int] = set()
        _return_freed_memory_to_the_system()

    def path(self, i: int) -> Path:
        return self.folder / f"block_{i}.safetensors"

    def block_of(self, name: str) -> int | None:
        """The index of the block that module or tensor `name` (dotted, model-level) lies in; None outside."""
        if not name.startswith(self.prefix + "."):
            return None
        head = name[len(self.prefix) + 1 :].split(".", 1)[0]
        return int(head) if head.isdigit() else None

    def tensor_file(self, name: str) -> tuple[Path, str]:
        """(file, key) of block tensor `name` (model-level) as last written to the offload folder."""
        i = self.block_of(name)
        if i is None or i not in self.written:
            raise RuntimeError(f"{name} is not in a block written to {self.folder}")
        return self.path(i), name[len(self.prefix) + 1 :].split(".", 1)[1]

    def is_loaded(self, i: int) -> bool:
        return not any(p.is_meta for p in self.blocks[i].parameters())

    def offload(self, i: int, write: bool = True) -> None:
        """Write block `i` (weights, buffers, masks) to its file (unless `write` is False) and free it."""
        from safetensors.torch import save_file

        block = self.blocks[i]
        if write:
            tensors = {name: t.detach().contiguous() for name, t in block.state_dict(keep_vars=True).items()}
            for name, module in block.named_modules():
                mask = module._buffers.get(MASK_BUFFER)
                if mask is not None:
                    tensors[f"{name}.{MASK_BUFFER}" if name else MASK_BUFFER] = mask.contiguous()
            tmp = self.path(i).with_suffix(".tmp")
            save_file(tensors, str(tmp))
            os.replace(tmp, self.path(i))
            self.written.add(i)
        for module in block.modules():
            if MASK_BUFFER in module._buffers:
                detach_mask(module)
        for name, param in list(block.named_parameters()):
            _set_tensor(block, name, torch.empty_like(param, device="meta"))
        _return_freed_memory_to_the_system()

    def onload(self, i: int) -> nn.Module:
        """Bring block `i` into memory (from the offload folder, else from its source checkpoint)."""
        from safetensors import safe_open

        block = self.blocks[i]
        if self.is_loaded(i):
            return block
        names = set(block.state_dict().keys())
        masks: dict[str, torch.Tensor] = {}
        if i in self.written:
            with safe_open(str(self.path(i)), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118  (a safe_open handle has no __iter__)
                    if key.endswith(MASK_BUFFER):
                        masks[key[: -len(MASK_BUFFER) - 1]] = f.get_tensor(key)
                    else:
                        _set_tensor(block, key, f.get_tensor(key))
        elif i in self.source:
            files, prefix = self.source[i]
            found: set[str] = set()
            for file in files:
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118  (a safe_open handle has no __iter__)
                        if key.startswith(prefix) and key[len(prefix) :] in names:
                            _set_tensor(block, key[len(prefix) :], f.get_tensor(key))
                            found.add(key[len(prefix) :])
            missing = [n for n, p in block.named_parameters() if n not in found and p.is_meta]
            if missing:
                raise ConfigError(f"block {i}: the checkpoint has no tensor for {prefix}{missing[0]}.")
        else:
            raise RuntimeError(
                f"block {i} is neither in memory, in {self.folder}, nor in a source checkpoint"
            )
        for name, mask in masks.items():
            attach_mask(block.get_submodule(name), mask)
        return block

    def offload_all(self) -> None:
        """Write every block still in memory to the folder and free it."""
        for i in range(len(self.blocks)):
            if self.is_loaded(i):
                self.offload(i)

    def onload_all(self) -> None:
        """Bring every block back into memory (the whole model), e.g. to run it (saving does not need this)."""
        for i in range(len(self.blocks)):
            self.onload(i)


def attach_store(model: nn.Module, folder: str | os.PathLike) -> BlockStore:
    """The model's store in `folder` (created, with every in-memory block written out, if it has none)."""
    store = block_store(model)
    if store is None or store.folder != Path(folder):
        previous = store
        store = BlockStore(model, folder, source=previous.source if previous is not None else None)
        if previous is not None:  # blocks already written elsewhere: bring them over one at a time
            for i in range(len(store.blocks)):
                if i in previous.written:
                    previous.onload(i)
                    store.offload(i)
        model.__dict__[STORE_ATTR] = store
    store.offload_all()
    return store


def onload_all(model: nn.Module) -> nn.Module:
    """Bring an offloaded model's blocks back into memory and forget the store; returns the model."""
    store = block_store(model)
    if store is not None:
        store.onload_all()
        del model.__dict__[STORE_ATTR]
    return model


def check_offloadable(model: nn.Module, plans: list) -> None:
    """Reject what sequential onloading cannot do, before anything changes."""
    for plan in plans:
        if layer_index(model, plan.name) is None:
            raise ConfigError(
                f"{plan.name!r} lies outside the repeated blocks; with offload_dir only block layers can be pruned "
                "(they are calibrated one block at a time). Exclude it or prune without offloading."
            )
        if plan.rule.scope == "global":
            raise ConfigError("scope 'global' needs every layer at once; it cannot be used with offload_dir.")
    types = getattr(model.config, "layer_types", None)
    if types and len(set(types)) > 1:
        raise ConfigError(
            f"{type(model).__name__} mixes attention types across blocks ({sorted(set(types))}); sequential "
            "onloading supports models whose blocks share one attention type."
        )


def load_offloaded(
    path: str | os.PathLike, offload_dir: str | os.PathLike, *, task: str = "causal-lm"
) -> tuple:
    """(model, tokenizer) with the blocks left on disk: only the layers outside the blocks are read.

    Args:
        path: A model folder (or alias) with ``*.safetensors`` weights.
        offload_dir: Where pruned blocks are written.
        task: ``causal-lm`` (default) or ``base``.
    """
    import transformers
    from accelerate import init_empty_weights
    from safetensors import safe_open

    folder = Path(resolve_model(path))
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if f.name.startswith("model")]
    if not folder.is_dir() or not files:
        raise ConfigError(
            f"offloaded loading needs a local model folder with model*.safetensors files; got {str(path)!r}."
        )
    raw = json.loads((folder / "config.json").read_text())
    if "sparse_nlp" in raw:
        raise ConfigError(
            f"{folder} is already a sparse_nlp checkpoint; offloaded loading reads dense models."
        )
    config = transformers.AutoConfig.from_pretrained(folder)
    cls = {"causal-lm": transformers.AutoModelForCausalLM, "base": transformers.AutoModel}[task]
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config)
    model.eval()
    blocks_name = _full_blocks_name(model)
    keys: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            keys.update({k: file for k in f.keys()})  # noqa: SIM118
    prefix_fix = _key_prefix(model, keys)
    for name, param in list(model.named_parameters()):
        if name.startswith(blocks_name + "."):
            continue
        key = prefix_fix(name)
        if key not in keys:
            if name.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False):
                continue
            raise ConfigError(f"{folder}: no tensor {key!r} in the safetensors files.")
        with safe_open(str(keys[key]), framework="pt") as f:
            _set_tensor(model, name, f.get_tensor(key).to(param.dtype))
    model.tie_weights()
    source = {
        i: (
            sorted({keys[k] for k in keys if k.startswith(prefix_fix(f"{blocks_name}.{i}."))}),
            prefix_fix(f"{blocks_name}.{i}."),
        )
        for i in range(len(model.get_submodule(blocks_name)))
    }
    store = BlockStore(model, offload_dir, source=source)
    model.__dict__[STORE_ATTR] = store
    return model, load_tokenizer(str(folder))


def _full_blocks_name(model: nn.Module) -> str:
    base = getattr(model, "base_model", model)
    layers = model_targets(model).layers
    if base is model:
        return layers
    for name, module in model.named_modules():
        if module is base:
            return f"{name}.{layers}" if name else layers
    return layers


def _key_prefix(model: nn.Module, keys: dict[str, Any]):
    """Map a parameter name to its checkpoint key (older checkpoints drop the base-model prefix)."""
    prefix = getattr(model, "base_model_prefix", "")
    if (
        prefix
        and not any(k.startswith(prefix + ".") for k in keys)
        and any(n.startswith(prefix + ".") for n, _ in model.named_parameters())
    ):
        return lambda name: name[len(prefix) + 1 :] if name.startswith(prefix + ".") else name
    return lambda name: name
