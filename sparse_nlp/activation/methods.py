"""The activation sparsity methods: which tensors a method thresholds, and which models it applies to.

A method names *sites*: modules whose input (``teal``: a Linear layer) or output (``cats``: the activation
function of a gated FFN) is thresholded per token. Everything else (calibration, hooks, saving) is shared by
`sparse_nlp.activation.apply`.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from torch import nn

from ..config import ALLOCATIONS, ActivationSparsity
from ..errors import UnsupportedModelError
from ..linear import linear_weight
from ..registry import ACTIVATION_METHODS, suggest
from ..targets import model_targets, select_modules

Where = Literal["input", "output", "experts"]
ACT_ATTRS = ("act_fn", "activation_fn", "act")
"""Attribute names of the activation function module inside a gated FFN (llama-style, Phi-3, ModernBERT)."""


class ActivationMethod:
    """Base class: a method is registered in `sparse_nlp.registry.ACTIVATION_METHODS` by name."""

    name: ClassVar[str] = ""
    where: ClassVar[Where] = "input"
    """``input``: the site's input is thresholded (forward pre-hook); ``output``: its output (forward hook)."""
    option_defaults: ClassVar[dict[str, Any]] = {}

    @classmethod
    def option_problems(cls, options: dict[str, Any], path: str) -> list[str]:
        """Every bad option, each named (unknown keys with the known ones)."""
        known = sorted(cls.option_defaults)
        return [
            f"{path}.{key} is not an option of {cls.name!r}.{suggest(str(key), known)} "
            f"Known: {', '.join(known) or 'none'}."
            for key in options
            if key not in cls.option_defaults
        ]

    @classmethod
    def options(cls, spec: ActivationSparsity) -> dict[str, Any]:
        return {**cls.option_defaults, **spec.options}

    def sites(self, model: nn.Module, spec: ActivationSparsity) -> dict[str, nn.Module]:
        """Full module name -> the module whose input or output is thresholded, in model order.

        Raises:
            UnsupportedModelError: the method does not apply to this family (the message says why).
            TargetError: a target selects nothing.
        """
        raise NotImplementedError


@ACTIVATION_METHODS.register("teal")
class Teal(ActivationMethod):
    """TEAL (Liu et al., ICLR 2025): zero the entries of every targeted Linear layer's input whose magnitude is
    below a per-layer threshold. Options: ``allocation`` (``uniform``: every layer at the target; ``greedy``: per
    block, raise the sparsity of the layer whose increase changes the block output least, until the parameter-
    weighted mean reaches the target), ``step`` (the greedy increment, default 0.05), ``samples`` (calibration
    samples the greedy search runs each block on, default 4)."""

    name = "teal"
    where = "input"
    option_defaults = {"allocation": "uniform", "step": 0.05, "samples": 4}

    @classmethod
    def option_problems(cls, options: dict[str, Any], path: str) -> list[str]:
        out = super().option_problems(options, path)
        allocation = options.get("allocation", "uniform")
        if allocation not in ALLOCATIONS:
            out.append(
                f"{path}.allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}."
                f"{suggest(str(allocation), list(ALLOCATIONS))}"
            )
        step = options.get("step", 0.05)
        if isinstance(step, bool) or not isinstance(step, int | float) or not 0.0 < float(step) <= 0.5:
            out.append(f"{path}.step must be a number in (0, 0.5], got {step!r}.")
        samples = options.get("samples", 4)
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            out.append(f"{path}.samples must be an integer >= 1, got {samples!r}.")
        return out

    def sites(self, model: nn.Module, spec: ActivationSparsity) -> dict[str, nn.Module]:
        entry = model_targets(model)
        if entry.inferred:
            raise UnsupportedModelError(
                f"activation sparsity needs a targets-table entry for {model.config.model_type} (the inferred layout "
                "serves weight sparsity only); give one with sparse_nlp.targets.use_targets."
            )
        return select_modules(model, spec.targets, spec.exclude)


def block_part(model: nn.Module, name: str) -> tuple[str, str] | None:
    """(block prefix, path inside the block) of a full module name, or None outside the repeated blocks."""
    entry = model_targets(model)
    m = re.match(rf"^(.*?{re.escape(entry.layers)}\.\d+)\.(.+)$", name)
    return (m.group(1), m.group(2)) if m else None


def gated_act(model: nn.Module, ffn_out_name: str) -> tuple[str, nn.Module] | None:
    """The activation module of the gated FFN that holds the Linear layer `ffn_out_name`, or None."""
    parent_name = ffn_out_name.rsplit(".", 1)[0]
    parent = model.get_submodule(parent_name)
    for attr in ACT_ATTRS:
        act = getattr(parent, attr, None)
        if isinstance(act, nn.Module):
            return f"{parent_name}.{attr}", act
    return None


@ACTIVATION_METHODS.register("cats")
class Cats(ActivationMethod):
    """CATS (Lee et al., 2024): in a gated FFN ``down(act(gate(x)) * up(x))``, zero the entries of ``act(gate(x))``
    whose magnitude is below a per-FFN threshold, so the matching rows of ``up`` and columns of ``down`` are idle.
    Needs a gated FFN (llama-style gate_proj / up_proj, Phi-3's gate_up_proj, ModernBERT's Wi)."""

    name = "cats"
    where = "output"

    def sites(self, model: nn.Module, spec: ActivationSparsity) -> dict[str, nn.Module]:
        entry = model_targets(model)
        model_type = model.config.model_type
        if entry.experts and not entry.ffn_out:
            raise UnsupportedModelError(
                f"activation method 'cats' is not available for {model_type}: its FFNs are fused mixture-of-experts "
                "parameters, not gated Linear layers; use method 'teal' (attention layers)."
            )
        if not entry.gated or entry.inferred:
            raise UnsupportedModelError(
                f"activation method 'cats' needs a gated FFN (down(act(gate(x)) * up(x))), but {model_type}'s FFN "
                f"is not gated ({' -> '.join(entry.ffn_linears)}); use method 'teal'."
            )
        selected = select_modules(model, spec.targets, spec.exclude)
        out: dict[str, nn.Module] = {}
        suffix = "." + entry.ffn_out
        for name in selected:
            found = block_part(model, name)
            if found is None or found[1] not in entry.ffn_linears:
                continue
            block = found[0]
            act = gated_act(model, block + suffix)
            if act is None:
                raise UnsupportedModelError(
                    f"activation method 'cats': the FFN {block + suffix.rsplit('.', 1)[0]!r} of {model_type} has no "
                    f"activation module ({', '.join(ACT_ATTRS)}) to threshold; use method 'teal'."
                )
            out.setdefault(act[0], act[1])
        if not out:
            raise UnsupportedModelError(
                f"activation method 'cats' thresholds FFNs, but targets {spec.targets} select no FFN layer of this "
                f"{model_type} model; use targets ['ffn']."
            )
        shared = {id(m) for m in out.values()}
        if len(shared) != len(out):
            raise UnsupportedModelError(
                f"activation method 'cats': {model_type} shares one activation module between FFNs, so each FFN "
                "cannot have its own threshold; use method 'teal'."
            )
        return out


def get_activation_method(name: str) -> ActivationMethod:
    """An instance of the registered method `name` (`RegistryError` with the known names otherwise)."""
    return ACTIVATION_METHODS.get(name)()


FFN_ACT_ATTRS = (*ACT_ATTRS, "intermediate_act_fn", "activation")
"""Where the activation module of an FFN sits, gated or not (BERT-style ``intermediate_act_fn``, DistilBERT)."""
ROUTERS = ("similarity",)


@ACTIVATION_METHODS.register("moefication")
class Moefication(ActivationMethod):
    """MoEfication: each FFN's neurons split into ``experts`` groups; per token a router keeps ``top_k`` of them
    (default: ``round((1 - sparsity) * experts)``) and the other neurons' activations are zeroed. Options:
    ``experts`` (default 16), ``top_k``, ``router`` (``similarity``). See `sparse_nlp.activation.experts`."""

    name = "moefication"
    where = "experts"
    option_defaults = {"experts": 16, "top_k": None, "router": "similarity"}

    @classmethod
    def option_problems(cls, options: dict[str, Any], path: str) -> list[str]:
        out = super().option_problems(options, path)
        experts = options.get("experts", 16)
        if isinstance(experts, bool) or not isinstance(experts, int) or experts < 2:
            out.append(f"{path}.experts must be an integer >= 2, got {experts!r}.")
            experts = None
        top_k = options.get("top_k")
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
                out.append(f"{path}.top_k must be an integer >= 1 (or null: from sparsity), got {top_k!r}.")
            elif experts is not None and top_k > experts:
                out.append(f"{path}.top_k is {top_k}, larger than the number of experts ({experts}).")
        router = options.get("router", "similarity")
        if router not in ROUTERS:
            out.append(
                f"{path}.router must be one of {', '.join(ROUTERS)}, got {router!r}.{suggest(str(router), list(ROUTERS))}"
            )
        return out

    @classmethod
    def top_k(cls, spec: ActivationSparsity) -> int:
        """Experts kept per token: the ``top_k`` option, else ``round((1 - sparsity) * experts)`` (at least 1)."""
        options = cls.options(spec)
        if options["top_k"] is not None:
            return int(options["top_k"])
        return max(1, round((1.0 - spec.sparsity) * int(options["experts"])))

    def ffns(
        self, model: nn.Module, spec: ActivationSparsity
    ) -> dict[str, tuple[nn.Module, str, nn.Module, int]]:
        """Activation module name -> (activation module, first projection name, first projection, neurons)."""
        entry = model_targets(model)
        model_type = model.config.model_type
        if entry.inferred or not entry.ffn_in or not entry.ffn_out:
            raise UnsupportedModelError(
                f"activation method 'moefication' is not available for {model_type}: "
                + (
                    "its FFNs are fused mixture-of-experts parameters already"
                    if entry.experts
                    else "it needs a targets-table entry with the FFN layers"
                )
                + "; use method 'teal'."
            )
        selected = select_modules(model, spec.targets, spec.exclude)
        out: dict[str, tuple[nn.Module, str, nn.Module, int]] = {}
        experts = int(self.options(spec)["experts"])
        for name in selected:
            found = block_part(model, name)
            if found is None or found[1] not in entry.ffn_linears:
                continue
            block = found[0]
            first_name = f"{block}.{entry.ffn_in[0]}"
            parent_name = first_name.rsplit(".", 1)[0]
            parent = model.get_submodule(parent_name)
            act_attr = next(
                (a for a in FFN_ACT_ATTRS if isinstance(getattr(parent, a, None), nn.Module)), None
            )
            if act_attr is None:
                raise UnsupportedModelError(
                    f"activation method 'moefication': the FFN {parent_name!r} of {model_type} has no activation "
                    f"module ({', '.join(FFN_ACT_ATTRS)}) to zero; use method 'teal'."
                )
            down = model.get_submodule(f"{block}.{entry.ffn_out}")
            width = linear_weight(down).shape[1]  # the FFN's intermediate neurons
            if width < experts:
                raise UnsupportedModelError(
                    f"activation method 'moefication': {parent_name!r} has {width} neurons, fewer than "
                    f"options.experts = {experts}."
                )
            out.setdefault(
                f"{parent_name}.{act_attr}",
                (getattr(parent, act_attr), first_name, model.get_submodule(first_name), width),
            )
        if not out:
            raise UnsupportedModelError(
                f"activation method 'moefication' splits FFNs, but targets {spec.targets} select no FFN layer of this "
                f"{model_type} model; use targets ['ffn']."
            )
        if len({id(v[0]) for v in out.values()}) != len(out):
            raise UnsupportedModelError(
                f"activation method 'moefication': {model_type} shares one activation module between FFNs; use "
                "method 'teal'."
            )
        return out

    def sites(self, model: nn.Module, spec: ActivationSparsity) -> dict[str, nn.Module]:
        return {name: parts[0] for name, parts in self.ffns(model, spec).items()}
