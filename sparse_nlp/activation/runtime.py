"""`accelerate(model)`: run the thresholded Linear layers through the batch-1 activation-sparse kernel.

`ActivationLinear` is a drop-in for ``nn.Linear`` (and transformers' ``Conv1D``) that holds its threshold and a
transposed copy of the weight (in, out). With one token (decoding) and no gradient it runs the native kernel, which
reads only the weight rows of the inputs above the threshold; otherwise the dense product on the zeroed input.
``weight`` and ``bias`` stay the original parameters under their usual names, so ``state_dict`` and saving are
unchanged (the transposed copy is not saved). A pruned weight (at most `COMPRESS_DENSITY` nonzero) can be kept
compressed to its nonzeros, so the kernel skips the pruned weights too (activation and weight sparsity compose);
by default each layer keeps whichever of the two kernels is faster on the CPU.

TEAL sites are replaced directly; for CATS the FFN output projection (``down_proj``) gets threshold 0.0, so the
inputs the gate threshold zeroed are skipped. For MoEfication the FFN's input projections become `ExpertRowsLinear`
layers, which compute one token's kept experts only (the others' outputs are zeros), and its output projection an
`ActivationLinear` with threshold 0.0, which skips the zeros. `revert` (also `remove_activation` and
``sparse_nlp.to_dense``) puts the original modules back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..linear import is_prunable, is_transposed, linear_weight
from ..pruning.masking import MASK_BUFFER
from ..targets import model_targets
from . import kernel
from .apply import STATE_ATTR, activation_state, attach_thresholds
from .experts import ExpertRouter

REVERT_ATTR = "_sparse_nlp_activation_revert"


COMPRESS_DENSITY = 0.7
"""`ActivationLinear` may keep a weight with at most this fraction of nonzeros compressed
(`kernel.CompressedRows`), so its decoding product skips the pruned weights as well as the zeroed inputs."""


def _share_mask(module: nn.Module, layer: nn.Module) -> None:
    """Register the weight mask of `layer` (if any) on its replacement `module`, unsaved."""
    mask = layer._buffers.get(MASK_BUFFER)
    if mask is not None:
        module.register_buffer(MASK_BUFFER, mask, persistent=False)


class ActivationLinear(nn.Module):
    """y = x_s W^T + b, where x_s keeps the entries of x with ``|x| > threshold``.

    The transposed copy of the weight is dense, or compressed to its nonzeros (a pruned weight, at most
    `COMPRESS_DENSITY` nonzero): then the one-token product reads neither the weights of zeroed inputs nor the
    pruned weights.

    Args:
        layer: The ``nn.Linear`` or ``Conv1D`` replaced (its parameters are shared, not copied).
        threshold: Magnitude at or below which inputs are zeroed (0.0 zeroes exact zeros only).
        compressed: For a pruned weight: True keeps it compressed, False dense, None (default) whichever of the
            two kernels is faster on this CPU, timed on the layer (`kernel.compressed_is_faster`).
    """

    def __init__(self, layer: nn.Module, threshold: float, compressed: bool | None = None) -> None:
        super().__init__()
        self.original = [layer]  # in a list: not a submodule (its parameters are registered here already)
        self.transposed = is_transposed(layer)
        self.weight = layer.weight
        self.bias = layer.bias
        self.threshold = float(threshold)
        weight = layer.weight.detach() if self.transposed else layer.weight.detach().t()
        weight_t = weight.float().contiguous()  # (in, out)
        self.in_features, self.out_features = weight_t.shape
        packed = None
        if compressed is not False and float((weight_t != 0).float().mean()) <= COMPRESS_DENSITY:
            packed = kernel.compress(weight_t)
            if compressed is None and not kernel.compressed_is_faster(weight_t, packed):
                packed = None
        self.compressed = packed is not None
        if packed is not None:
            for name in ("bits", "offsets", "vals"):
                self.register_buffer(name, getattr(packed, name), persistent=False)
        self.register_buffer("weight_t", None if self.compressed else weight_t, persistent=False)
        _share_mask(self, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.numel() // shape[-1]
        if (
            tokens == 1
            and not torch.is_grad_enabled()
            and x.dtype == torch.float32
            and x.device.type == "cpu"
        ):
            bias = None if self.bias is None else self.bias.detach()
            if self.compressed:
                packed = kernel.CompressedRows(self.bits, self.offsets, self.vals, self.out_features)
                y = kernel.masked_activation_linear(x.reshape(1, -1), packed, bias, self.threshold)
            else:
                y = kernel.activation_linear(
                    x.reshape(1, -1), self.weight_t, bias, self.threshold
                )  # (1, out)
            return y.reshape(*shape[:-1], self.out_features)
        kept = torch.where(x.abs() > self.threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))
        if self.transposed:
            out = kept.reshape(-1, shape[-1]) @ self.weight
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(*shape[:-1], self.out_features)
        return F.linear(kept, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold:.4g}, "
            f"compressed={self.compressed}"
        )


class ExpertRowsLinear(nn.Module):
    """An FFN input projection (gate, up, or the first projection of an ungated FFN) under MoEfication that, for
    one token, computes only the output rows (neurons) of the experts the router keeps; the other outputs are zeros.

    The rows are kept in a private copy grouped by expert, (experts, rows per expert, in), the smaller experts
    padded with zero rows, so each kept expert's weights are contiguous and read once (`kernel.expert_rows`). With
    more tokens, or with a gradient, it runs the original layer. The projection whose input the router scores
    (`routes`) also hands the router its choice for the activation hook, which zeroes the skipped neurons (for one
    token only where the activation does not map 0 to 0: otherwise they are zero already).

    Args:
        layer: The ``nn.Linear`` or ``Conv1D`` replaced (its parameters are shared, not copied).
        router: The FFN's `ExpertRouter`.
        routes: Whether this is the projection whose input the router scores (the FFN's first).
    """

    def __init__(self, layer: nn.Module, router: ExpertRouter, routes: bool) -> None:
        super().__init__()
        self.original = [layer]  # in a list: not a submodule (its parameters are registered here already)
        self.weight = layer.weight
        self.bias = layer.bias
        self.router = router
        self.routes = routes
        weight = linear_weight(layer).detach().float()  # (F, H)
        self.out_features, self.in_features = weight.shape
        experts, assign = router.experts, router.assign
        size = int(torch.bincount(assign, minlength=experts).max())
        # row r of expert e is neuron rows[e, r]; padding rows point at the spare output slot F
        rows = torch.full((experts, size), self.out_features, dtype=torch.long)
        grouped = weight.new_zeros(experts, size, self.in_features)
        grouped_bias = weight.new_zeros(experts, size)
        for e in range(experts):
            neurons = (assign == e).nonzero().flatten()
            rows[e, : neurons.numel()] = neurons
            grouped[e, : neurons.numel()] = weight[neurons]
            if layer.bias is not None:
                grouped_bias[e, : neurons.numel()] = layer.bias.detach().float()[neurons]
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("weight_grouped", grouped, persistent=False)  # (E, S, H)
        self.register_buffer("bias_grouped", None if layer.bias is None else grouped_bias, persistent=False)
        _share_mask(self, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.numel() // shape[-1]
        if tokens != 1 or torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu":
            if self.routes:
                self.router.route(x)
            return self.original[0](x)
        flat = x.reshape(-1)
        chosen = self.router.choose(flat)  # (k,)
        if self.routes:  # the activation hook needs the kept neurons only where act(0) is not 0
            router = self.router
            router.keep = None
            if not router.act_keeps_zero:
                router.route(x, chosen.reshape(*shape[:-1], -1))
        out = kernel.expert_rows(
            flat, self.weight_grouped, chosen, self.bias_grouped, self.rows, self.out_features
        )
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, experts={self.router.experts}, "
            f"top_k={self.router.top_k}"
        )


def _swap(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def accelerate(model: nn.Module, compressed: bool | None = None) -> int:
    """Replace the thresholded Linear layers of `model` by `ActivationLinear` layers (in place; inference); under
    MoEfication, each FFN's input projections by `ExpertRowsLinear` and its output projection by an
    `ActivationLinear` that skips zero inputs.

    `compressed` decides how a pruned weight is held (see `ActivationLinear`): None (default) times both kernels on
    each layer and keeps the faster, True always compresses, False never.

    Returns the number of layers replaced. Calling it again changes nothing. Raises `ValueError` when the model
    has no activation sparsity attached.
    """
    state = activation_state(model)
    if state is None:
        raise ValueError("the model has no activation sparsity: sparsify it (or from_pretrained) first.")
    if model.__dict__.get(REVERT_ATTR) is not None:
        return 0
    kernel.ops()  # build (or warn) now, not inside the first generated token
    swapped: dict[str, nn.Module] = {}
    if state.where == "input":
        for handle in state.handles:
            handle.remove()
        state.handles = []
        for name, t in state.thresholds.items():
            module = model.get_submodule(name)
            if is_prunable(module):
                swapped[name] = _swap(model, name, ActivationLinear(module, t, compressed))
    elif state.where == "experts":
        swapped = _accelerate_experts(model, state.handles, compressed)
    else:  # CATS: the output projection of each thresholded FFN skips the zeros the gate threshold left
        entry = model_targets(model)
        for name in state.thresholds:
            ffn = name.rsplit(".", 1)[0]
            out_name = f"{ffn}.{entry.ffn_out.rsplit('.', 1)[1]}"
            module = model.get_submodule(out_name)
            if is_prunable(module):
                swapped[out_name] = _swap(model, out_name, ActivationLinear(module, 0.0, compressed))

    def restore(model: nn.Module) -> None:
        for name, original in swapped.items():
            _swap(model, name, original)
        model.__dict__.pop(REVERT_ATTR, None)

    model.__dict__[REVERT_ATTR] = restore
    return len(swapped)


def _accelerate_experts(
    model: nn.Module, routers: list[ExpertRouter], compressed: bool | None
) -> dict[str, nn.Module]:
    """Swap each MoEfication FFN's input projections for `ExpertRowsLinear` and its output projection for an
    `ActivationLinear` (threshold 0.0); the routers' hooks stay on the original modules (used again after `revert`)
    and on the activation modules. Input projections of more rows than neurons (a fused gate/up) are left alone."""
    entry = model_targets(model)
    names = {id(module): name for name, module in model.named_modules()}
    swapped: dict[str, nn.Module] = {}
    for router in routers:
        first_name = names[id(router.first)]
        block = first_name[: -len(entry.ffn_in[0])].rstrip(".")
        prefix = f"{block}." if block else ""
        width = router.assign.numel()
        for i, part in enumerate(entry.ffn_in):
            name = prefix + part
            module = model.get_submodule(name)
            if is_prunable(module) and linear_weight(module).shape[0] == width:
                swapped[name] = _swap(model, name, ExpertRowsLinear(module, router, routes=i == 0))
        out_name = prefix + entry.ffn_out
        module = model.get_submodule(out_name)
        if is_prunable(module):
            swapped[out_name] = _swap(model, out_name, ActivationLinear(module, 0.0, compressed))
    return swapped


def revert(model: nn.Module) -> nn.Module:
    """Undo `accelerate`: the original layers come back, with the hooks of the attached thresholds."""
    restore = model.__dict__.get(REVERT_ATTR)
    if restore is None:
        return model
    restore(model)
    state = model.__dict__.get(STATE_ATTR)
    if state is not None and state.where != "experts":  # the expert routers' hooks were never removed
        attach_thresholds(model, state.method, state.thresholds)
    return model
