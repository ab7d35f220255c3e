"""`accelerate(model)`: run the thresholded Linear layers through the batch-1 activation-sparse kernel.

`ActivationLinear` is a drop-in for ``nn.Linear`` (and transformers' ``Conv1D``) that holds its threshold and a
transposed copy of the weight (in, out). With one token (decoding) and no gradient it runs the native kernel, which
reads only the weight rows of the inputs above the threshold; otherwise the dense product on the zeroed input.
``weight`` and ``bias`` stay the original parameters under their usual names, so ``state_dict`` and saving are
unchanged (the transposed copy is not saved). A weight mask is carried over (the zeros of weight sparsity stay in
the transposed copy, so the product is right; the kernel does not skip them).

TEAL sites are replaced directly; for CATS the FFN output projection (``down_proj``) gets threshold 0.0, so the
inputs the gate threshold zeroed are skipped. `revert` (also `remove_activation` and ``sparse_nlp.to_dense``) puts
the original modules back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..linear import is_prunable, is_transposed
from ..pruning.masking import MASK_BUFFER
from ..targets import model_targets
from . import kernel
from .apply import STATE_ATTR, activation_state, attach_thresholds

REVERT_ATTR = "_sparse_nlp_activation_revert"


class ActivationLinear(nn.Module):
    """y = x_s W^T + b, where x_s keeps the entries of x with ``|x| > threshold``.

    Args:
        layer: The ``nn.Linear`` or ``Conv1D`` replaced (its parameters are shared, not copied).
        threshold: Magnitude at or below which inputs are zeroed (0.0 zeroes exact zeros only).
    """

    def __init__(self, layer: nn.Module, threshold: float) -> None:
        super().__init__()
        self.original = [layer]  # in a list: not a submodule (its parameters are registered here already)
        self.transposed = is_transposed(layer)
        self.weight = layer.weight
        self.bias = layer.bias
        self.threshold = float(threshold)
        weight_t = layer.weight.detach() if self.transposed else layer.weight.detach().t()
        self.register_buffer("weight_t", weight_t.float().contiguous(), persistent=False)  # (in, out)
        self.in_features, self.out_features = self.weight_t.shape
        mask = layer._buffers.get(MASK_BUFFER)
        if mask is not None:
            self.register_buffer(MASK_BUFFER, mask, persistent=False)

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
            y = kernel.activation_linear(x.reshape(1, -1), self.weight_t, bias, self.threshold)  # (1, out)
            return y.reshape(*shape[:-1], self.out_features)
        kept = torch.where(x.abs() > self.threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))
        if self.transposed:
            out = kept.reshape(-1, shape[-1]) @ self.weight
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(*shape[:-1], self.out_features)
        return F.linear(kept, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold:.4g}"


def _swap(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def accelerate(model: nn.Module) -> int:
    """Replace the thresholded Linear layers of `model` by `ActivationLinear` layers (in place; inference).

    Returns the number of layers replaced. Calling it again changes nothing. Raises `ValueError` when the model
    has no activation sparsity attached.
    """
    state = activation_state(model)
    if state is None:
        raise ValueError("the model has no activation sparsity: sparsify it (or from_pretrained) first.")
    if state.where == "experts":
        raise ValueError(
            "accelerate runs teal and cats; moefication zeroes the skipped experts by hooks (there is no "
            "expert-skipping kernel)."
        )
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
                swapped[name] = _swap(model, name, ActivationLinear(module, t))
    else:  # CATS: the output projection of each thresholded FFN skips the zeros the gate threshold left
        entry = model_targets(model)
        for name in state.thresholds:
            ffn = name.rsplit(".", 1)[0]
            out_name = f"{ffn}.{entry.ffn_out.rsplit('.', 1)[1]}"
            module = model.get_submodule(out_name)
            if is_prunable(module):
                swapped[out_name] = _swap(model, out_name, ActivationLinear(module, 0.0))

    def restore(model: nn.Module) -> None:
        for name, original in swapped.items():
            _swap(model, name, original)
        model.__dict__.pop(REVERT_ATTR, None)

    model.__dict__[REVERT_ATTR] = restore
    return len(swapped)


def revert(model: nn.Module) -> nn.Module:
    """Undo `accelerate`: the original layers come back, with the hooks of the attached thresholds."""
    restore = model.__dict__.get(REVERT_ATTR)
    if restore is None:
        return model
    restore(model)
    state = model.__dict__.get(STATE_ATTR)
    if state is not None:
        attach_thresholds(model, state.method, state.thresholds)
    return model
