"""Keeping weights sparse: masks as module buffers, re-applied after every optimizer step.

A pruned layer carries its keep-mask as a non-persistent buffer named ``weight_mask`` (same layout as
``weight``), so ``.to()``, DDP and the stock ``Trainer`` see it without special cases, and
``state_dict()`` / ``save_pretrained`` stay plain (the checkpoint module writes masks on its own).

Zeros are kept exactly by one process-wide optimizer step post-hook (installed the first time a mask is
attached, never at import): after any ``torch.optim`` optimizer steps, every parameter that has a mask is
multiplied by it. This covers weight decay, Adam's momentum and any optimizer, in the Trainer, in
accelerate loops and in hand-written loops alike. Gradients of pruned entries are
masked too, so the optimizer state of a pruned weight stays zero.

A model copied with ``copy.deepcopy`` keeps its mask buffers but is not tracked; call `track_masks` on the
copy (``sparse_nlp.from_pretrained`` and ``sparsify`` do this themselves).

Sharded parameters (FSDP2's ``fully_shard`` turns each weight into a ``DTensor`` holding one shard per
process): the mask buffer stays whole and identical on every process, and is laid out as the weight (same
device mesh and placements, each process cutting its own shard, no communication) where it multiplies it.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterator

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

MASK_BUFFER = "weight_mask"

# modules that carry a mask; weak so that models are freed normally (nn.Module hashes by identity).
_MASKED_MODULES: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_HOOK_HANDLE = None


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a ``DTensor`` (a parameter sharded by FSDP2 or tensor parallelism).

    No DTensor can exist before ``torch.distributed.tensor`` is imported, so this never imports it.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def mask_like_weight(module: nn.Module, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`mask` laid out as `weight`: itself for a plain tensor; for a sharded weight, a ``DTensor`` with the
    weight's mesh and placements, built from the whole mask every process holds (cached on the module)."""
    if not is_sharded(weight) or is_sharded(mask):
        return mask
    cached = module.__dict__.get("_sparse_nlp_sharded_mask")
    if cached is not None and cached[0] is mask and cached[1]() is weight:
        return cached[2]
    from torch.distributed.tensor import distribute_tensor  # only reached once DTensors exist

    # src_data_rank=None: every process cuts its shard from its own (identical) copy, no communication
    sharded = distribute_tensor(
        mask.to(weight.device), weight.device_mesh, weight.placements, src_data_rank=None
    )
    module.__dict__["_sparse_nlp_sharded_mask"] = (mask, weakref.ref(weight), sharded)
    return sharded


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if not _MASKED_MODULES:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    with torch.no_grad():
        for module in list(_MASKED_MODULES):
            mask = module._buffers.get(MASK_BUFFER)
            if mask is not None and id(module.weight) in stepped:
                module.weight.mul_(mask_like_weight(module, module.weight, mask))


def _ensure_hook() -> None:
    global _HOOK_HANDLE
    if _HOOK_HANDLE is None:
        _HOOK_HANDLE = register_optimizer_step_post_hook(_after_optimizer_step)


def _mask_grad(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    mask = getattr(module, MASK_BUFFER, None)
    return grad if mask is None else grad * mask_like_weight(module, grad, mask)


def attach_mask(module: nn.Module, mask: torch.Tensor) -> None:
    """Give `module` a keep-mask (layout of ``module.weight``), zero the pruned weights and keep them zero.

    Attaching again replaces the mask (e.g. gradual pruning raising the sparsity).
    """
    weight = module.weight
    if mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}")
    mask = mask.to(device=weight.device, dtype=torch.bool)
    if MASK_BUFFER in module._buffers:
        module._buffers[MASK_BUFFER] = mask
    else:
        module.register_buffer(MASK_BUFFER, mask, persistent=False)
    hooked = module.__dict__.get("_sparse_nlp_hooked")
    if hooked is None or hooked() is not weight:  # new, or a deep copy whose hook sits on the original
        module_ref = weakref.ref(module)
        # the hook holds the module weakly so a deleted model is not kept alive by its own parameter
        module.__dict__["_sparse_nlp_grad_hook"] = weight.register_hook(
            lambda g, ref=module_ref: _mask_grad(ref(), g) if ref() is not None else g
        )
        module.__dict__["_sparse_nlp_hooked"] = weakref.ref(weight)
    _MASKED_MODULES.add(module)
    _ensure_hook()
    with torch.no_grad():
        weight.mul_(mask_like_weight(module, weight, mask))


def track_masks(model: nn.Module) -> int:
    """Re-arm zero-keeping for every module of `model` that has a mask buffer (e.g. after ``copy.deepcopy``)."""
    count = 0
    for _, module in masked_modules(model):
        attach_mask(module, module._buffers[MASK_BUFFER])
        count += 1
    return count


def detach_mask(module: nn.Module) -> None:
    """Remove a module's mask and hooks; the weights keep their current values (zeros included)."""
    if MASK_BUFFER in module._buffers:
        del module._buffers[MASK_BUFFER]
    handle = module.__dict__.pop("_sparse_nlp_grad_hook", None)
    hooked = module.__dict__.pop("_sparse_nlp_hooked", None)
    if handle is not None and hooked is not None and hooked() is module.weight:
        handle.remove()
    _MASKED_MODULES.discard(module)


def derives_mask(module: nn.Module) -> bool:
    """Whether `module` records a keep-mask it rebuilds on demand instead of holding a mask buffer (a layer packed
    by `sparse_nlp.runtime.convert`: its packed index is the mask; it defines ``keeps_mask`` and
    ``derived_mask()``)."""
    return bool(getattr(module, "keeps_mask", False)) and callable(getattr(module, "derived_mask", None))


def get_mask(module: nn.Module) -> torch.Tensor | None:
    """The keep-mask of `module` (layout of its weight): its mask buffer, or the mask a packed layer rebuilds
    (a new tensor on each call), or None."""
    mask = module._buffers.get(MASK_BUFFER)
    if mask is None and derives_mask(module):
        mask = module.derived_mask()
    return mask


def masked_modules(model: nn.Module, derived: bool = False) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every module that carries a mask buffer, in model order; with `derived`, also the packed
    layers that record a mask without a buffer (`derives_mask`; read their masks with `get_mask`)."""
    for name, module in model.named_modules():
        if module._buffers.get(MASK_BUFFER) is not None or (derived and derives_mask(module)):
            yield name, module


@torch.no_grad()
def apply_masks(model: nn.Module) -> int:
    """Multiply every masked weight by its mask (for code that wrote weights by hand). Returns the count."""
    count = 0
    for _, module in masked_modules(model):
        module.weight.mul_(mask_like_weight(module, module.weight, module._buffers[MASK_BUFFER]))
        count += 1
    return count
