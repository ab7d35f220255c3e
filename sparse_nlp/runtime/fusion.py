"""Activations folded into the preceding packed layer: the kernel applies them to its output tile before writing it.

In BERT-style encoders (BERT, RoBERTa, ELECTRA, DeBERTa, MiniLM, ...) the feed-forward block's ``*Intermediate``
module runs ``intermediate_act_fn(dense(x))`` with an exact (erf) GELU; DistilBERT's ``FFN`` runs
``activation(lin1(x))``. After `convert` packs the layer, the GELU is applied by the native kernel on each tile of
outputs while it is in L1, which saves a separate pass over the ``(tokens, intermediate_size)`` output. The
module's activation is replaced by `FusedActivation` (an identity that keeps the original, so `revert` restores
it), and the fusion is checked on a random input before it is kept: a module whose forward uses the layer's output
in any other way keeps its activation.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .layer import SparseLinear

logger = logging.getLogger(__name__)

_PROBE_TOKENS = 5
PAIRS = (("dense", "intermediate_act_fn"), ("lin1", "activation"))
"""(layer attribute, activation attribute) of the modules whose activation can follow their packed layer."""


class FusedActivation(nn.Module):
    """Stands in for an activation that the preceding `SparseLinear` applies itself: an identity.

    `original` is the activation module it replaced (put back by `unfuse_activations` / `runtime.revert`), `layer`
    the attribute name of the packed layer that applies it."""

    def __init__(self, original: nn.Module, kind: str, layer: str) -> None:
        super().__init__()
        self.original = original
        self.kind = kind
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"applied by the preceding packed layer ({self.layer}): {self.kind}"


def activation_kind(act: nn.Module) -> str | None:
    """``"gelu"`` for an exact GELU module (transformers' ``GELUActivation``, ``nn.GELU()``), else None."""
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else None
    if type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is F.gelu:
        return "gelu"
    return None


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module, str, str, str]]:
    """(module name, module, layer attribute, activation attribute, kind) for each activation that could be fused."""
    found = []
    for name, module in model.named_modules():
        for layer_attr, act_attr in PAIRS:
            layer = getattr(module, layer_attr, None)
            act = getattr(module, act_attr, None)
            if isinstance(layer, SparseLinear) and layer.activation is None and isinstance(act, nn.Module):
                kind = activation_kind(act)
                if kind is not None:
                    found.append((name, module, layer_attr, act_attr, kind))
    return found


def fuse_activations(model: nn.Module) -> int:
    """Fold each exact GELU that follows a packed layer (``*Intermediate`` modules, DistilBERT's ``FFN``) into the
    layer.

    Returns how many were folded. Each is checked on a random input of a few tokens (the module's output with and
    without the fusion must agree to 1e-5); one that does not agree, or whose forward fails, stays as it was."""
    fused = 0
    for name, module, layer_attr, act_attr, kind in _candidates(model):
        layer, act = getattr(module, layer_attr), getattr(module, act_attr)
        x = torch.randn(_PROBE_TOKENS, layer.in_features, generator=torch.Generator().manual_seed(0))
        training = module.training
        module.eval()  # dropout off: the probe compares two deterministic outputs
        try:
            with torch.inference_mode():
                before = module(x)
                layer.activation = kind
                setattr(module, act_attr, FusedActivation(act, kind, layer_attr))
                after = module(x)
            agree = torch.allclose(after, before, rtol=1e-4, atol=1e-5)
        except Exception as err:  # noqa: BLE001 - any failure means: leave the module as it was
            logger.debug("sparse_nlp: not fusing the activation of %s (%s)", name, err)
            agree = False
        finally:
            module.train(training)
        if agree:
            fused += 1
        else:
            layer.activation = None
            setattr(module, act_attr, act)
    return fused


def unfuse_activations(model: nn.Module) -> None:
    """Put back every activation that `fuse_activations` folded into a packed layer."""
    for module in list(model.modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, FusedActivation):
                setattr(module, attr, child.original)
                layer = getattr(module, child.layer, None)
                if isinstance(layer, SparseLinear):
                    layer.activation = None


__all__ = ["PAIRS", "FusedActivation", "activation_kind", "fuse_activations", "unfuse_activations"]
