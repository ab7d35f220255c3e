"""Activations folded into the preceding packed layer: the kernel applies them to its output tile before writing it.

In BERT-style encoders (BERT, RoBERTa, ELECTRA, DeBERTa, MiniLM, ...) the feed-forward block's ``*Intermediate``
module runs ``intermediate_act_fn(dense(x))`` with an exact (erf) GELU. After `convert` packs ``dense``, the GELU is
applied by the native kernel on each tile of outputs while it is in L1, which saves a separate pass over the
``(tokens, intermediate_size)`` output. The module's ``intermediate_act_fn`` is replaced by `FusedActivation` (an
identity that keeps the original, so `revert` restores it), and the fusion is checked on a random input before it
is kept: a module whose forward uses ``dense`` in any other way keeps its activation.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .layer import SparseLinear

logger = logging.getLogger(__name__)

_PROBE_TOKENS = 5


class FusedActivation(nn.Module):
    """Stands in for an activation that the preceding `SparseLinear` applies itself: an identity.

    `original` is the activation module it replaced (put back by `unfuse_activations` / `runtime.revert`)."""

    def __init__(self, original: nn.Module, kind: str) -> None:
        super().__init__()
        self.original = original
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"applied by the preceding packed layer: {self.kind}"


def activation_kind(act: nn.Module) -> str | None:
    """``"gelu"`` for an exact GELU module (transformers' ``GELUActivation``, ``nn.GELU()``), else None."""
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else None
    if type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is F.gelu:
        return "gelu"
    return None


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module, SparseLinear, str]]:
    found = []
    for name, module in model.named_modules():
        dense = getattr(module, "dense", None)
        act = getattr(module, "intermediate_act_fn", None)
        if (
            not isinstance(dense, SparseLinear)
            or dense.activation is not None
            or not isinstance(act, nn.Module)
        ):
            continue
        kind = activation_kind(act)
        if kind is not None:
            found.append((name, module, dense, kind))
    return found


def fuse_activations(model: nn.Module) -> int:
    """Fold each exact GELU that follows a packed ``dense`` layer (``*Intermediate`` modules) into the layer.

    Returns how many were folded. Each is checked on a random input of a few tokens (the module's output with and
    without the fusion must agree to 1e-5); one that does not agree, or whose forward fails, stays as it was."""
    fused = 0
    for name, module, dense, kind in _candidates(model):
        act = module.intermediate_act_fn
        x = torch.randn(_PROBE_TOKENS, dense.in_features, generator=torch.Generator().manual_seed(0))
        try:
            with torch.inference_mode():
                before = module(x)
                dense.activation = kind
                module.intermediate_act_fn = FusedActivation(act, kind)
                after = module(x)
            agree = torch.allclose(after, before, rtol=1e-4, atol=1e-5)
        except Exception as err:  # noqa: BLE001 - any failure means: leave the module as it was
            logger.debug("sparse_nlp: not fusing the activation of %s (%s)", name, err)
            agree = False
        if agree:
            fused += 1
        else:
            dense.activation = None
            module.intermediate_act_fn = act
    return fused


def unfuse_activations(model: nn.Module) -> None:
    """Put back every activation that `fuse_activations` folded into a packed layer."""
    for module in list(model.modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, FusedActivation):
                setattr(module, attr, child.original)
                dense = getattr(module, "dense", None)
                if isinstance(dense, SparseLinear):
                    dense.activation = None


__all__ = ["FusedActivation", "activation_kind", "fuse_activations", "unfuse_activations"]
