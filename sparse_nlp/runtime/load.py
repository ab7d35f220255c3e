"""Load checkpoint tensors into an empty model and pack each sparse Linear layer as it arrives.

`sparse_nlp.from_pretrained(path, runtime="sparse")` builds the model without weights (parameters on the
``meta`` device), then fills it from a `TensorSource` (the checkpoint's files, read one tensor at a time by
`sparse_nlp.checkpoint`): every tensor that is not a masked Linear weight is read and set as it is; each masked
Linear weight is decoded (from the compact encoding or the dense file) into one dense temporary with its mask,
checked, attached and packed by `convert` on its own, and the temporary is dropped before the next layer. The
peak memory is the packed model plus one layer, never a dense copy of the whole model.

Each layer's temporaries (its dense weight, mask and index tensors) are freed between long-lived packed tensors.
glibc's allocator keeps such freed gaps resident (its mmap threshold rises once a large block is freed, so later
temporaries of a few MB come from the heap), which grew the resident size of a MiniLM load by about a fifth of a
dense copy; where the C library is glibc, the free pages are handed back after each layer (``malloc_trim``), a
no-op elsewhere (`release_free_memory`).

The result equals loading the model dense and calling `convert` on it: same tensors, same masks, and the same
per-layer plan (`convert` is called for each layer with the same arguments, so the autotune sees the same packed
weight). `plan_load` returns None where this path does not apply (a tensor the model lacks, a model tensor the
checkpoint lacks, a tied masked weight, a mask on something that is not a Linear layer, a non-fp32 tensor); the
caller then loads dense and converts, as before.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import platform
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import CheckpointError
from ..formats.compact import decode_entry
from ..pruning.masking import MASK_BUFFER, attach_mask
from .convert import _packable, convert

logger = logging.getLogger(__name__)


class TensorSource(Protocol):
    """The tensors of a checkpoint, read on demand.

    ``entries`` maps each state-dict key to its compact header entry (``encoding``, ``shape``, ``dtype``, and for
    encoded weights ``module`` and the encoding's fields; a dense file's tensors are all ``"dense"``). Indexing
    with a stored tensor name (``KEY``, ``KEY.__values``, ...) reads that tensor and raises KeyError for a name the
    files lack; ``where`` names the files in errors.
    """

    entries: dict[str, dict[str, Any]]
    where: str

    def __getitem__(self, name: str) -> torch.Tensor: ...


MaskCheck = Callable[[str, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""(base-relative module name, decoded weight, decoded mask or None) -> the mask to attach (raises if bad)."""


@dataclass
class LoadPlan:
    """Which model tensor each checkpoint key fills, and the masked layers to pack (in model order)."""

    owners: dict[str, list[tuple[nn.Module, str, bool]]] = field(default_factory=dict)
    """key -> every (module, attribute, is_parameter) that holds the tensor (tied weights share one key)."""
    layers: dict[str, tuple[str, str]] = field(default_factory=dict)
    """module name -> (weight key, base-relative module name) for each masked Linear layer."""
    others: list[str] = field(default_factory=list)
    """the packable modules without a mask (`convert` packs them by their nonzeros, as it does after a dense load)."""


def plan_load(
    model: nn.Module, entries: Mapping[str, dict[str, Any]], masked: Mapping[str, str]
) -> tuple[LoadPlan | None, str]:
    """How to fill the empty `model` from checkpoint `entries`; (None, reason) where the packed load does not apply.

    Args:
        model: built on the meta device (buffers may be real).
        entries: compact header entries by state-dict key (see `TensorSource`).
        masked: base-relative module name -> the module's name in `model`, for every masked module.
    """
    state = model.state_dict(keep_vars=True)
    by_tensor: dict[int, list[str]] = {}
    for key, tensor in state.items():
        by_tensor.setdefault(id(tensor), []).append(key)
    unexpected = sorted(set(entries) - set(state))
    if unexpected:
        return None, f"the checkpoint holds tensors the model does not have ({unexpected[:3]})"
    for key, entry in entries.items():
        if entry.get("dtype") not in ("float32",) and state[key].is_floating_point():
            return None, f"{key} is stored as {entry.get('dtype')}, not float32"
    holders: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((module, name, True))
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                holders.setdefault(id(b), []).append((module, name, False))
    plan = LoadPlan()
    for ident, keys in by_tensor.items():
        stored = [k for k in keys if k in entries]
        if not stored:
            return None, f"the checkpoint lacks {keys[0]}"
        plan.owners[stored[0]] = holders.get(ident, [])
    names = dict(model.named_modules())
    for rel, module_name in masked.items():
        module = names.get(module_name)
        key = f"{module_name}.weight" if module_name else "weight"
        if module is None or not _packable(module) or key not in plan.owners:
            return None, f"masked {rel!r} is not a Linear layer whose weight the checkpoint holds"
        if len(by_tensor[id(state[key])]) > 1 or len(plan.owners[key]) > 1:
            return None, f"masked {rel!r} shares its weight with another module"
        plan.layers[module_name] = (key, rel)
    order = {n: i for i, n in enumerate(names)}
    plan.layers = dict(sorted(plan.layers.items(), key=lambda item: order[item[0]]))
    plan.others = [n for n, m in names.items() if _packable(m) and n not in plan.layers]
    return plan, ""


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (another C library or system, or not found)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Hand the free pages of the C heap back to the system (glibc ``malloc_trim(0)``); False where that is not
    available (then nothing is done: memory use only, never results, depends on it)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def give_mask(module: nn.Module, mask: torch.Tensor) -> None:
    """Hand `mask` to the layer about to be packed, as its mask buffer (what `convert` packs by).

    Not `attach_mask`: a packed layer replaces the module at once, so it needs no zero-keeping hooks, and its weight
    is not multiplied by the mask (a float copy of the mask per layer), because packing by the mask keeps only the
    kept entries whatever the pruned ones hold. A layer that `pack` leaves dense gets `attach_mask` afterwards.
    """
    module.register_buffer(MASK_BUFFER, mask.to(torch.bool), persistent=False)


def _set(plan: LoadPlan, key: str, tensor: torch.Tensor) -> None:
    """Put `tensor` wherever the model holds `key` (one Parameter shared by tied holders)."""
    holders = plan.owners[key]
    if holders and holders[0][2]:
        module, name, _ = holders[0]
        tensor = nn.Parameter(tensor, requires_grad=module._parameters[name].requires_grad)
    for module, name, is_param in holders:
        if is_param:
            module._parameters[name] = tensor
        else:
            module._buffers[name] = tensor


def _check_shape(key: str, tensor: torch.Tensor, expected: torch.Size, where: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise CheckpointError(
            f"{where}: tensor {key!r} has shape {tuple(tensor.shape)} but the model expects {tuple(expected)}."
        )


def load_packed(
    model: nn.Module,
    source: TensorSource,
    plan: LoadPlan,
    check_mask: MaskCheck,
    pack: Callable[..., nn.Module] = convert,
    **convert_kwargs: Any,
) -> nn.Module:
    """Fill the empty `model` from `source` following `plan`, packing each masked layer as soon as it is loaded.

    Args:
        model: the model `plan_load` planned for (meta parameters).
        source: the checkpoint's tensors.
        plan: from `plan_load`.
        check_mask: validates each decoded layer and returns the mask to attach (see `MaskCheck`).
        pack: the conversion, called as ``pack(model, modules=[name], fuse=False, **convert_kwargs)`` for each
            layer and ``pack(model, modules=others, **convert_kwargs)`` at the end, which also fuses the activations
            (default: `convert`).
        **convert_kwargs: passed to `pack` for every layer (its defaults otherwise).

    Returns:
        `model`, loaded and converted.
    """
    layer_keys = {key for key, _ in plan.layers.values()}
    # embeddings, norms, biases, unmasked weights: as stored. Each key leaves the plan once set, so that the plan
    # holds no module that `pack` replaces (a replaced layer must be freed, with its dense weight).
    for key in [k for k in plan.owners if k not in layer_keys]:
        tensor, _ = decode_entry(key, source.entries[key], source, source.where)
        if plan.owners[key]:
            module, name, is_param = plan.owners[key][0]
            current = module._parameters[name] if is_param else module._buffers[name]
            _check_shape(key, tensor, current.shape, source.where)
            del module, current
        _set(plan, key, tensor)
        plan.owners.pop(key)
        del tensor
    for module_name, (key, rel) in plan.layers.items():  # one dense temporary at a time
        weight, mask = decode_entry(key, source.entries[key], source, source.where)
        module, name, _ = plan.owners[key][0]
        _check_shape(key, weight, module._parameters[name].shape, source.where)
        mask = check_mask(rel, weight, mask)
        _set(plan, key, weight)
        del weight
        give_mask(module, mask)
        del module, mask
        plan.owners.pop(key)
        pack(
            model, modules=[module_name], **{**convert_kwargs, "fuse": False}
        )  # fused once, by the last call
        layer = model.get_submodule(module_name)
        if (
            layer._buffers.get(MASK_BUFFER) is not None
        ):  # left dense by `pack`: masked as a dense load masks it
            attach_mask(layer, layer._buffers[MASK_BUFFER])
        del layer
        release_free_memory()  # this layer's temporaries, freed between packed tensors
    pack(model, modules=plan.others, **convert_kwargs)
    release_free_memory()
    return model


__all__ = ["LoadPlan", "MaskCheck", "TensorSource", "load_packed", "plan_load", "release_free_memory"]
