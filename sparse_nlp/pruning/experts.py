"""Mixture-of-experts weights: fused 3-D expert parameters pruned per expert slice, masked and kept sparse.

In transformers 5 the experts of Mixtral / Qwen-MoE blocks are two parameters of one module,
``mlp.experts.gate_up_proj`` (E, 2F, H) and ``mlp.experts.down_proj`` (E, H, F), each expert's slice laid out
(out_features, in_features) like a Linear weight. Each slice is pruned on its own with the rule's method and
pattern; the mask (same shape as the parameter) is a non-persistent buffer ``<param>_mask`` on the experts
module, kept exactly like Linear masks (`sparse_nlp.pruning.masking`): pruned gradients are zeroed and an
optimizer step post-hook multiplies the parameter by its mask. The router (``mlp.gate``) is never a target.

Calibrated methods (Wanda, SparseGPT) see each expert's *routed* inputs only: a forward pre-hook on the experts
module reads the tokens and the router's top-k choice it is called with, and for each expert e sums the
statistics of the tokens sent to e: the block input for ``gate_up_proj[e]``, and ``act(gate) * up`` of those
tokens (the experts module's own gating, with the current weights) for ``down_proj[e]``. An expert that receives
no calibration token is pruned by magnitude instead, with a warning naming it.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..errors import UnsupportedModelError
from ..targets import base_relative_name, model_targets
from .masking import MASK_BUFFER
from .methods import LayerStats, PruningMethod, get_method
from .patterns import Pattern

logger = logging.getLogger(__name__)

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


@dataclass
class ExpertPlan:
    """One fused expert parameter (E, out, in) to prune: its owner, and the rule's method, budget and pattern."""

    name: str  # full parameter name
    module: nn.Module  # the experts module
    param_name: str  # gate_up_proj or down_proj
    method: PruningMethod
    sparsity: float
    pattern: Pattern
    scope: str

    @property
    def needs_data(self) -> bool:
        """Whether the method needs each expert's routed calibration inputs."""
        return self.method.needs_calibration


def check_expert_layout(module: nn.Module, name: str) -> None:
    """Refuse an experts module whose fused layout the routed statistics would read wrongly.

    The statistics assume transformers' default layout: (E, out, in) slices, gate and up concatenated in
    ``gate_up_proj``, no biases, no norm after each expert.
    """
    flags = {
        "is_transposed": (False, "slices stored (in, out)"),
        "is_concatenated": (True, "gate and up interleaved"),
        "has_bias": (False, "expert biases"),
        "has_gate": (True, "no gate_up_proj"),
        "has_post_expert_norm": (False, "a norm after each expert"),
    }
    for flag, (expected, what) in flags.items():
        if getattr(module, flag, expected) != expected:
            raise UnsupportedModelError(
                f"{name}: calibrated pruning of fused experts reads transformers' default expert layout; this experts "
                f"module has {what} ({flag}={not expected}). Prune these experts with magnitude instead."
            )
    for attr in ("gate_up_proj", "down_proj"):
        if not isinstance(module._parameters.get(attr), torch.Tensor):
            raise UnsupportedModelError(
                f"{name}: calibrated pruning of fused experts needs the experts module's {attr} parameter."
            )


def _gated(module: nn.Module, gate_up_out: torch.Tensor) -> torch.Tensor:
    """The experts module's gating of its (n, 2F) gate_up output: ``act(gate) * up``, (n, F)."""
    apply_gate = getattr(module, "_apply_gate", None)
    if apply_gate is not None:
        return apply_gate(gate_up_out)
    gate, up = gate_up_out.chunk(2, dim=-1)  # (n, F) each
    return module.act_fn(gate) * up


def _add(stats: LayerStats, x: torch.Tensor, hessian: bool) -> None:
    """Add the rows of x (n, in), float, to one expert slice's statistics."""
    sq = (x * x).sum(0)  # (in,)
    stats.sq_norm = sq if stats.sq_norm is None else stats.sq_norm + sq
    if hessian:
        stats.hessian = x.t() @ x if stats.hessian is None else stats.hessian.addmm_(x.t(), x)  # (in, in)
    stats.count += x.shape[0]


class ExpertStats:
    """Forward pre-hooks on experts modules that sum each expert's statistics over the tokens routed to it.

    ``stats[name][e]`` is the `LayerStats` of slice e of parameter `name` (a Hessian for the plans whose method
    asks for one). Set `token_mask` to the (B, T) real-token mask of the batch being run (padding is left out);
    while `recording` is set the hooks do nothing (a run of the dense block for other layers' dense inputs).
    """

    def __init__(self, plans: list[ExpertPlan]) -> None:
        self.token_mask: torch.Tensor | None = None
        self.recording = False
        self.stats: dict[str, list[LayerStats]] = {}
        wanted: dict[int, tuple[nn.Module, dict[str, tuple[str, bool]]]] = {}
        for plan in plans:
            num_experts = plan.module._parameters[plan.param_name].shape[0]
            self.stats[plan.name] = [LayerStats() for _ in range(num_experts)]
            entry = wanted.setdefault(id(plan.module), (plan.module, {}))
            entry[1][plan.param_name] = (plan.name, plan.method.needs_hessian)
        self._handles = [
            module.register_forward_pre_hook(self._hook(params), with_kwargs=True)
            for module, params in wanted.values()
        ]

    def _hook(self, params: dict[str, tuple[str, bool]]):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.recording:
                return
            hidden = args[0] if args else kwargs["hidden_states"]  # (N, H) the block's tokens, flattened
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]  # (N, k) experts chosen by the router
            x = hidden.detach().reshape(-1, hidden.shape[-1])  # (N, H)
            index = index.detach().reshape(x.shape[0], -1)  # (N, k)
            valid = None
            if self.token_mask is not None and self.token_mask.numel() == x.shape[0]:
                valid = self.token_mask.reshape(-1).to(x.device)  # (N,)
            gate_up = module._parameters["gate_up_proj"]  # (E, 2F, H)
            for e in range(gate_up.shape[0]):
                routed = (index == e).any(dim=-1)  # (N,)
                if valid is not None:
                    routed &= valid
                if not bool(routed.any()):
                    continue
                xe = x[routed].float()  # (n_e, H)
                if "gate_up_proj" in params:
                    name, hessian = params["gate_up_proj"]
                    _add(self.stats[name][e], xe, hessian)
                if "down_proj" in params:
                    name, hessian = params["down_proj"]
                    inner = _gated(module, xe @ gate_up[e].detach().float().t())  # (n_e, F)
                    _add(self.stats[name][e], inner.float(), hessian)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def prune_experts(experts: list[ExpertPlan], stats: dict[str, list[LayerStats]] | None = None) -> None:
    """Prune each expert slice (out, in) of each planned parameter on its own and attach the stacked mask.

    Args:
        experts: The fused expert parameters to prune, with their method, budget, pattern and scope.
        stats: For calibrated methods, full parameter name -> one `LayerStats` per expert (`ExpertStats`). An
            expert without any routed calibration token is pruned by magnitude, with a warning.
    """
    fallback = get_method("magnitude")
    for plan in experts:
        param = plan.module._parameters[plan.param_name]  # (E, out, in)
        per_expert = (stats or {}).get(plan.name)
        masks = []
        for e in range(param.shape[0]):
            method, expert_stats = plan.method, None
            if plan.method.needs_calibration:
                expert_stats = per_expert[e] if per_expert is not None else None
                if expert_stats is None or expert_stats.count == 0:
                    logger.warning(
                        "%s: expert %d received no calibration token; pruned by magnitude instead of %s "
                        "(more or longer calibration samples route tokens to it).",
                        plan.name,
                        e,
                        plan.method.name,
                    )
                    method, expert_stats = fallback, None
            mask, new_weight = method.prune_layer(
                param[e], plan.sparsity, plan.pattern, plan.scope, expert_stats
            )  # (out, in)
            if new_weight is not None:
                param[e].copy_(new_weight)
            masks.append(mask)
        attach_expert_mask(plan.module, plan.param_name, torch.stack(masks))  # (E, out, in)


def expert_names(model: nn.Module) -> list[str]:
    """Base-relative names of the masked expert parameters (the checkpoint metadata form)."""
    return [base_relative_name(model, name) for name, *_ in masked_experts(model)]
