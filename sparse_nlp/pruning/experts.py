"""Mixture-of-experts weights: fused 3-D expert parameters pruned per expert slice, masked and kept sparse.

In transformers 5 the experts of Mixtral / Qwen-MoE blocks are two parameters of one module,
``mlp.experts.gate_up_proj`` (E, 2F, H) and ``mlp.experts.down_proj`` (E, H, F), each expert's slice laid out
(out_features, in_features) like a Linear weight. Each slice is pruned on its own with the rule's method and
pattern; the mask (same shape as the parameter) is a non-persistent buffer ``<param>_mask`` on the experts
module, kept exactly like Linear masks (`sparse_nlp.pruning.masking`): pruned gradients are zeroed and an
optimizer step post-hook multiplies the parameter by its mask. The router (``mlp.gate``) is never a target.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterator

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..targets import base_relative_name, model_targets
from .masking import MASK_BUFFER

SUFFIX = "_mask"
_MASKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_HOOK = None


def _after_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if not _MASKED:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    with torch.no_grad():
        for module in list(_MASKED):
            for param_name, mask in _masks_of(module):
                param = getattr(module, param_name)
                if id(param) in stepped:
                    param.mul_(mask)


def _masks_of(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for key, buf in module._buffers.items():
        if key == MASK_BUFFER:  # a Linear layer's own mask (sparse_nlp.pruning.masking)
            continue
        if buf is not None and key.endswith(SUFFIX) and key[: -len(SUFFIX)] in module._parameters:
            yield key[: -len(SUFFIX)], buf


def attach_expert_mask(module: nn.Module, param_name: str, mask: torch.Tensor) -> None:
    """Give ``module.<param_name>`` a keep-mask (its own shape), zero the pruned entries and keep them zero."""
    param = module._parameters[param_name]
    if mask.shape != param.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match {param_name} shape {tuple(param.shape)}"
        )
    key = param_name + SUFFIX
    mask = mask.to(device=param.device, dtype=torch.bool)
    if key in module._buffers:
        module._buffers[key] = mask
    else:
        module.register_buffer(key, mask, persistent=False)
    hooks = module.__dict__.setdefault("_sparse_nlp_expert_hooks", {})
    if param_name not in hooks or hooks[param_name][1]() is not param:
        ref = weakref.ref(module)

        def grad_hook(g: torch.Tensor, ref=ref, key=key) -> torch.Tensor:
            owner = ref()
            m = None if owner is None else owner._buffers.get(key)
            return g if m is None else g * m

        hooks[param_name] = (param.register_hook(grad_hook), weakref.ref(param))
    _MASKED.add(module)
    global _HOOK
    if _HOOK is None:
        _HOOK = register_optimizer_step_post_hook(_after_step)
    with torch.no_grad():
        param.mul_(mask)


def detach_expert_masks(module: nn.Module) -> None:
    """Remove the expert masks and hooks of `module`; the weights keep their values."""
    for param_name, _ in list(_masks_of(module)):
        del module._buffers[param_name + SUFFIX]
    for handle, _ in module.__dict__.pop("_sparse_nlp_expert_hooks", {}).values():
        handle.remove()
    _MASKED.discard(module)


def masked_experts(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """(full parameter name, module, parameter name, mask) of every masked expert parameter."""
    for name, module in model.named_modules():
        for param_name, mask in _masks_of(module):
            yield f"{name}.{param_name}" if name else param_name, module, param_name, mask


def track_expert_masks(model: nn.Module) -> int:
    """Re-arm zero-keeping of every expert mask of `model` (e.g. after ``copy.deepcopy``)."""
    found = list(masked_experts(model))
    for _, module, param_name, mask in found:
        attach_expert_mask(module, param_name, mask)
    return len(found)


def select_experts(
    model: nn.Module, targets: list[str] | str, exclude: list[str] | tuple[str, ...] = ()
) -> dict[str, tuple[nn.Module, str]]:
    """Expert parameters chosen by groups (``ffn`` and ``all-linear`` include them) and ``re:`` regexes.

    Returns:
        Full parameter name -> (owning module, parameter name), in model order; empty for dense families.
    """
    entry = model_targets(model)
    if not entry.experts:
        return {}
    if isinstance(targets, str):
        targets = [targets]
    layer_re = re.compile(rf"^{re.escape(entry.layers)}\.\d+\.(.+)$")
    found: dict[str, tuple[nn.Module, str]] = {}
    for name, module in model.named_modules():
        for param_name in module._parameters:
            full = f"{name}.{param_name}"
            m = layer_re.match(base_relative_name(model, full))
            if not m or m.group(1) not in entry.experts:
                continue
            chosen = any(
                re.search(t[3:], full) if t.startswith("re:") else t in ("ffn", "all-linear") for t in targets
            )
            if chosen and not any(re.search(x, full) for x in exclude):
                found[full] = (module, param_name)
    return found


@torch.no_grad()
def prune_experts(
    experts: dict[str, tuple[nn.Module, str]], method, sparsity: float, pattern, scope: str
) -> None:
    """Prune each expert slice (out, in) of each parameter on its own and attach the stacked mask."""
    for module, param_name in experts.values():
        param = module._parameters[param_name]  # (E, out, in)
        masks = []
        for e in range(param.shape[0]):
            mask, new_weight = method.prune_layer(param[e], sparsity, pattern, scope, None)  # (out, in)
            if new_weight is not None:
                param[e].copy_(new_weight)
            masks.append(mask)
        attach_expert_mask(module, param_name, torch.stack(masks))  # (E, out, in)


def expert_names(model: nn.Module) -> list[str]:
    """Base-relative names of the masked expert parameters (the checkpoint metadata form)."""
    return [base_relative_name(model, name) for name, *_ in masked_experts(model)]
