"""`convert`: replace a model's sparse Linear layers by packed `SparseLinear` layers (in place); `revert` undoes it."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from ..pruning.masking import MASK_BUFFER, attach_mask
from . import autotune, kernels
from .formats import PackedWeight, pack_weight
from .fusion import fuse_activations, unfuse_activations
from .layer import BUCKETS, METHODS, SparseLinear, SparseRuntimeError

logger = logging.getLogger(__name__)

MAX_DENSITY = 0.7
"""Layers with more than this fraction of kept weights stay dense without timing (no sparse product wins there)."""


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def _packable(module: nn.Module) -> bool:
    conv1d = _conv1d_class()
    return type(module) is nn.Linear or (conv1d is not None and type(module) is conv1d)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _pack_module(module: nn.Module, mask: torch.Tensor | None) -> PackedWeight:
    """`module`'s weight (nn.Linear or Conv1D) packed by `mask` (its layout; None: by the nonzeros)."""
    weight = module.weight.detach()
    if isinstance(module, nn.Linear):
        return pack_weight(weight, mask)
    return pack_weight(weight.t(), None if mask is None else mask.t())  # (out, in)


def pack(
    module: nn.Module,
    plan: dict[int, str],
    mask: torch.Tensor | None,
    keep_mask: bool = True,
    packed: PackedWeight | None = None,
) -> SparseLinear:
    """A `SparseLinear` with `module`'s masked weight (nn.Linear or Conv1D) and bias; `packed`: the weight already
    packed by `mask` (`_pack_module`), so that it is not packed twice."""
    csr = _pack_module(module, mask) if packed is None else packed
    return SparseLinear(
        csr,
        module.bias,
        plan,
        transposed=not isinstance(module, nn.Linear),
        mask=mask if keep_mask and mask is not None else None,
    )


def convert(
    model: nn.Module,
    *,
    tokens: Sequence[int] = BUCKETS,
    methods: Sequence[str] = METHODS,
    modules: Sequence[str] | None = None,
    max_density: float = MAX_DENSITY,
    margin: float = 1.1,
    keep_masks: bool = True,
    use_cache: bool = True,
    fuse: bool = True,
) -> nn.Module:
    """Replace the sparse Linear (and Conv1D) layers of `model` by packed inference layers; returns `model`.

    A layer is packed by its keep-mask (the ``weight_mask`` buffer of a pruned model) or, without one, by its
    nonzero weights. Each layer whose density is at most `max_density` is timed with every method in `methods`
    (``native``, ``torch_csr``, ``dense``) at each token count in `tokens`; the layer keeps, per token bucket, the
    fastest (a sparse method must be `margin` times faster than dense). A layer where dense wins everywhere stays
    an ``nn.Linear``. With a single method no timing is done. Decisions are cached on disk (`autotune`).

    Args:
        model: fp32 model on the CPU.
        tokens: token counts (batch x sequence of one call of the layer) to plan for.
        methods: candidate products.
        modules: names of the modules to consider (default: every nn.Linear / Conv1D).
        max_density: layers denser than this stay dense without timing.
        margin: how much faster than dense a sparse method must be.
        keep_masks: each packed layer records its mask, so `save_pretrained` writes the masks (no memory: the
            packed index is the mask, `SparseLinear.derived_mask`); without it, a saved converted model records no
            masks for these layers.
        use_cache: read and write the on-disk autotune cache.
        fuse: fold the exact GELU after a packed feed-forward layer of BERT-style encoders into the layer's kernel
            (`fuse_activations`; checked on a random input before it is kept).

    Raises:
        SparseRuntimeError: a parameter that is not fp32 on the CPU, or an unknown method or module name.
    """
    bad = sorted(set(methods) - set(METHODS))
    if bad or not methods:
        raise SparseRuntimeError(f"methods must be a non-empty subset of {METHODS}, got {list(methods)}.")
    buckets = tuple(sorted({int(t) for t in tokens}))
    if not buckets or buckets[0] < 1:
        raise SparseRuntimeError(f"tokens must be positive integers, got {list(tokens)}.")
    named = dict(model.named_modules())
    if modules is not None:
        missing = [n for n in modules if n not in named]
        if missing:
            raise SparseRuntimeError(f"modules {missing} are not in {type(model).__name__}.")
        names = list(modules)
    else:
        names = [n for n, m in named.items() if _packable(m)]
    if "native" in methods:
        kernels.ops()  # build (or warn once) before timing
    converted = 0
    for name in names:
        module = named[name]
        if not _packable(module):
            continue
        weight = module.weight
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise SparseRuntimeError(
                f"{name}: runtime.convert packs fp32 CPU weights, got {weight.dtype} on {weight.device}; "
                "load the model in float32 on the CPU (dtype=torch.float32)."
            )
        mask = module._buffers.get(MASK_BUFFER)
        kept = int(torch.count_nonzero(mask if mask is not None else weight))  # no int64 copy (as sum)
        if kept > max_density * weight.numel():
            continue
        csr = _pack_module(module, mask)
        if len(methods) == 1:
            plan = dict.fromkeys(buckets, methods[0])
        else:
            plan = autotune.choose(csr, module.bias, buckets, methods, margin=margin, use_cache=use_cache)
        if set(plan.values()) == {"dense"} and len(methods) > 1:
            continue
        _set_module(model, name, pack(module, plan, mask, keep_mask=keep_masks, packed=csr))
        del csr
        converted += 1
    fused = fuse_activations(model) if fuse else 0
    logger.info(
        "sparse_nlp: runtime.convert packed %d layers, fused %d activations (%s)",
        converted,
        fused,
        kernels.status(),
    )
    return model


def converted_layers(model: nn.Module) -> dict[str, SparseLinear]:
    """The packed layers of `model` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def revert(model: nn.Module) -> nn.Module:
    """Replace every `SparseLinear` by the dense layer it came from (masks re-attached, fused activations put back);
    returns `model`."""
    unfuse_activations(model)
    conv1d = _conv1d_class()
    for name, layer in converted_layers(model).items():
        has_bias = layer.bias is not None
        if layer.transposed:
            dense = conv1d(layer.out_features, layer.in_features)
            if not has_bias:
                dense.bias = None
        else:
            dense = nn.Linear(layer.in_features, layer.out_features, bias=has_bias)
        with torch.no_grad():
            dense.weight.copy_(layer.weight)
            if has_bias:
                dense.bias.copy_(layer.bias)
        mask = layer.derived_mask()
        if mask is not None:
            attach_mask(dense, mask)
        _set_module(model, name, dense)
    return model


__all__ = ["MAX_DENSITY", "convert", "converted_layers", "pack", "revert"]
