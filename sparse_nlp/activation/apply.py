"""Calibrating, applying, removing and restoring dynamic activation sparsity on a transformers model.

Applied without changing any ``forward``: a TEAL site (a Linear layer) gets a forward *pre*-hook that zeroes the
entries of its input with ``|x| <= t``; a CATS site (the activation module of a gated FFN) gets a forward hook that
does the same to its output. At sparsity 0 every threshold is 0.0, which zeroes only exact zeros: the model's
outputs are exactly the dense ones.

The thresholds live in the model's metadata (``config.sparse_nlp["activation"]``, written to config.json by
``save_pretrained``) by base-model-relative site name, with the sparsity measured on the calibration data, and
`restore_activation` attaches them again on `sparse_nlp.from_pretrained`. Plain ``transformers`` loading such a
checkpoint gets the *dense* model: it keeps the ``sparse_nlp`` key as an unused config attribute, where the
thresholds stay visible (see the activation sparsity docs page).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import ActivationSparsity
from ..errors import ConfigError, MetadataError
from ..formats.manifest import METADATA_KEY
from ..pruning.calibration import calibration_batches
from ..targets import base_relative_name, resolve_module
from .calibrate import histograms, zero_fractions
from .experts import ExpertRouter, balanced_split, neuron_rows
from .greedy import greedy_sparsities
from .methods import ActivationMethod, Moefication, get_activation_method

logger = logging.getLogger(__name__)

STATE_ATTR = "_sparse_nlp_activation"
"""Where a model keeps its `ActivationState` (in ``model.__dict__``, not a submodule or a saved attribute)."""
META_KEY = "activation"
"""The key of the activation record inside the ``sparse_nlp`` metadata of config.json."""


@dataclass
class ActivationState:
    """What is attached to a model: the method, where it thresholds, the thresholds and the hook handles."""

    method: str
    where: str
    thresholds: dict[str, float]  # full module name -> threshold
    handles: list[Any] = field(default_factory=list)


def _zero_below(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.where(x.abs() > threshold, x, torch.zeros((), dtype=x.dtype, device=x.device))


def check_activation(
    model: nn.Module, spec: ActivationSparsity
) -> tuple[ActivationMethod, dict[str, nn.Module]]:
    """Validate `spec` and resolve its sites on `model` without changing anything.

    Raises:
        ConfigError: a bad field (every bad field named).
        UnsupportedModelError: the method does not apply to the family (e.g. CATS without a gated FFN).
        TargetError: a target selects nothing.
    """
    spec.validate()
    method = get_activation_method(spec.method)
    return method, method.sites(model, spec)


def attach_thresholds(model: nn.Module, method: str, thresholds: dict[str, float]) -> ActivationState:
    """Hook `thresholds` (full site name -> t) into `model`, replacing any activation sparsity it had."""
    remove_activation(model)
    where = get_activation_method(method).where
    state = ActivationState(method, where, dict(thresholds))
    for name, t in thresholds.items():
        module = model.get_submodule(name)
        if where == "input":

            def pre(module: nn.Module, args: tuple, t: float = t) -> tuple:
                return (_zero_below(args[0], t), *args[1:])

            state.handles.append(module.register_forward_pre_hook(pre))
        else:

            def post(module: nn.Module, args: tuple, out: torch.Tensor, t: float = t) -> torch.Tensor:
                return _zero_below(out, t)

            state.handles.append(module.register_forward_hook(post))
    model.__dict__[STATE_ATTR] = state
    return state


def attach_experts(
    model: nn.Module, spec: ActivationSparsity, maps: dict[str, torch.Tensor]
) -> ActivationState:
    """Hook MoEfication routers into `model` (activation module name -> (F,) expert of each neuron)."""
    remove_activation(model)
    method = Moefication()
    ffns = method.ffns(model, spec)
    experts = int(method.options(spec)["experts"])
    state = ActivationState("moefication", "experts", {})
    for name, assign in maps.items():
        act, _, first, _ = ffns[name]
        state.handles.append(ExpertRouter(first, act, assign, experts, method.top_k(spec)))
    model.__dict__[STATE_ATTR] = state
    return state


def activation_state(model: nn.Module) -> ActivationState | None:
    """The activation sparsity attached to `model`, or None."""
    return model.__dict__.get(STATE_ATTR)


def remove_activation(model: nn.Module) -> nn.Module:
    """Remove the activation hooks (and undo `sparse_nlp.activation.accelerate`); the metadata is left alone."""
    state = model.__dict__.pop(STATE_ATTR, None)
    if state is not None:
        for handle in state.handles:
            handle.remove()
    restore = model.__dict__.get("_sparse_nlp_activation_revert")
    if restore is not None:
        restore(model)
    return model


def calibrate_activation(
    model: nn.Module,
    spec: ActivationSparsity,
    data: Any,
    *,
    tokenizer: Any = None,
    num_samples: int = 128,
    seq_len: int = 128,
    progress: bool = True,
) -> dict[str, Any]:
    """Calibrate thresholds for `spec` on `data`, attach them, and measure the sparsity they give on that data.

    Args:
        model: A transformers model of a family the method accepts.
        spec: The activation part of a `SparsityConfig`.
        data: Calibration data, as for one-shot pruning (see `sparse_nlp.pruning.calibration.calibration_batches`).
        tokenizer: For text data.
        num_samples: Calibration samples used.
        seq_len: Tokens per sample at most.
        progress: Show progress (greedy allocation).

    Returns:
        The activation record written into the metadata (see `activation_record`).
    """
    method, sites = check_activation(model, spec)
    if data is None:
        raise ConfigError(
            f"activation method {spec.method!r} needs calibration data: pass data=[texts...] (and tokenizer=...) "
            "to sparsify, or --calibration on the command line."
        )
    remove_activation(model)
    batches = calibration_batches(data, tokenizer, num_samples=num_samples, seq_len=seq_len)
    if isinstance(method, Moefication):
        return _calibrate_experts(model, spec, method, batches)
    hists = histograms(model, sites, method.where, batches)
    options = method.options(spec)
    if options.get("allocation", "uniform") == "greedy" and spec.sparsity > 0:
        allocated = greedy_sparsities(
            model,
            sites,
            hists,
            spec.sparsity,
            float(options["step"]),
            batches,
            samples=int(options["samples"]),
            progress=progress,
        )
    else:
        allocated = dict.fromkeys(sites, float(spec.sparsity))
    thresholds = {name: hists[name].threshold(allocated[name]) for name in sites}
    attach_thresholds(model, spec.method, thresholds)
    per_site, overall = zero_fractions(model, sites, method.where, batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    rel = {name: base_relative_name(model, name) for name in sites}
    if method.where == "input":  # weighted by the weights each site's zeros let a batch-1 kernel skip
        sizes = {n: sites[n].weight.numel() for n in sites}
        skipped = sum(per_site[n] * sizes[n] for n in sites) / max(1, sum(sizes.values()))
    else:
        skipped = overall
    logger.info(
        "activation sparsity %s: %.2f%% measured on %d calibration tokens", spec.method, overall * 100, tokens
    )
    return {
        "method": spec.method,
        "where": method.where,
        "thresholds": {rel[n]: thresholds[n] for n in sites},
        "allocated": {rel[n]: round(allocated[n], 6) for n in sites},
        "measured": {
            "sparsity": round(overall, 6),
            "weight_weighted": round(skipped, 6),
            "per_site": {rel[n]: round(per_site[n], 6) for n in sites},
            "tokens": tokens,
            "samples": sum(int(b["input_ids"].shape[0]) for b in batches),
        },
    }


def _calibrate_experts(
    model: nn.Module, spec: ActivationSparsity, method: Moefication, batches: list[dict[str, torch.Tensor]]
) -> dict[str, Any]:
    """Split each FFN into experts, attach the routers, measure the zeroed fraction on the calibration batches."""
    ffns = method.ffns(model, spec)
    experts = int(method.options(spec)["experts"])
    maps = {
        name: balanced_split(neuron_rows(first, width), experts)
        for name, (_, _, first, width) in ffns.items()
    }
    attach_experts(model, spec, maps)
    sites = {name: parts[0] for name, parts in ffns.items()}
    per_site, overall = zero_fractions(model, sites, "output", batches)
    rel = {name: base_relative_name(model, name) for name in sites}
    return {
        "method": spec.method,
        "where": "experts",
        "experts": experts,
        "top_k": method.top_k(spec),
        "expert_maps": {rel[n]: maps[n].tolist() for n in sites},
        "measured": {
            "sparsity": round(overall, 6),
            "weight_weighted": round(overall, 6),
            "per_site": {rel[n]: round(per_site[n], 6) for n in sites},
            "tokens": sum(int(b["attention_mask"].sum()) for b in batches),
            "samples": sum(int(b["input_ids"].shape[0]) for b in batches),
        },
    }


def _restore_experts(
    model: nn.Module, spec: ActivationSparsity, record: dict[str, Any], where: str
) -> ActivationState:
    method = Moefication()
    ffns = method.ffns(model, spec)
    experts = int(method.options(spec)["experts"])
    maps = record.get("expert_maps")
    if not isinstance(maps, dict) or not maps:
        raise MetadataError(
            f"config.json: {where}.expert_maps must be a non-empty object of FFN -> expert list."
        )
    expected = {base_relative_name(model, n): n for n in ffns}
    out = {}
    for rel, assign in maps.items():
        if rel not in expected:
            raise MetadataError(
                f"config.json: {where}.expert_maps names {rel!r}, which activation.targets does not select."
            )
        width = ffns[expected[rel]][3]
        if (
            not isinstance(assign, list)
            or len(assign) != width
            or not all(isinstance(e, int) and not isinstance(e, bool) and 0 <= e < experts for e in assign)
        ):
            raise MetadataError(
                f"config.json: {where}.expert_maps[{rel!r}] must list an expert in [0, {experts}) for each of the "
                f"{width} neurons."
            )
        out[expected[rel]] = torch.tensor(assign, dtype=torch.long)
    missing = sorted(set(expected) - set(maps))
    if missing:
        raise MetadataError(f"config.json: {where}.expert_maps has no expert map for {missing[:3]}.")
    return attach_experts(model, spec, out)


def activation_record(model_or_config: Any) -> dict[str, Any] | None:
    """The activation record of a model's metadata (``config.sparse_nlp["activation"]``), or None."""
    config = getattr(model_or_config, "config", model_or_config)
    meta = getattr(config, METADATA_KEY, None)
    if not isinstance(meta, dict):
        return None
    return meta.get(META_KEY)


def check_record(record: Any, where: str = f"{METADATA_KEY}.{META_KEY}") -> dict[str, float]:
    """The thresholds of an activation record, checked; `MetadataError` naming the bad entry otherwise."""
    if not isinstance(record, dict):
        raise MetadataError(f"{where} must be a JSON object, got {record!r:.80}.")
    thresholds = record.get("thresholds")
    if not isinstance(thresholds, dict) or not thresholds:
        raise MetadataError(f"{where}.thresholds must be a non-empty object of site -> threshold.")
    for name, t in thresholds.items():
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise MetadataError(f"{where}.thresholds[{name!r}] must be a finite number >= 0, got {t!r:.40}.")
    return {str(k): float(v) for k, v in thresholds.items()}


def restore_activation(model: nn.Module, spec: ActivationSparsity) -> ActivationState:
    """Attach the thresholds recorded in `model`'s metadata (after `sparse_nlp.from_pretrained` loaded it).

    Raises:
        MetadataError: the record is missing or damaged, or names sites the config does not select.
    """
    where = f"{METADATA_KEY}.{META_KEY}"
    record = activation_record(model)
    if record is None:
        raise MetadataError(
            f"config.json: the sparsity config has an activation part but {where} (the calibrated thresholds) is "
            "missing; calibrate again with sparse_nlp.sparsify(..., data=...)."
        )
    if not isinstance(record, dict) or record.get("method") != spec.method:
        found = record.get("method") if isinstance(record, dict) else record
        raise MetadataError(
            f"config.json: {where}.method is {found!r:.40} but the sparsity config says {spec.method!r}."
        )
    if spec.method == "moefication":
        return _restore_experts(model, spec, record, where)
    thresholds = check_record(record, where)
    _, sites = check_activation(model, spec)
    full = {}
    expected = {base_relative_name(model, n): n for n in sites}
    for rel, t in thresholds.items():
        if rel not in expected:
            try:
                resolve_module(model, rel)
            except KeyError:
                raise MetadataError(
                    f"config.json: {where}.thresholds names {rel!r}, not a module of the model."
                ) from None
            raise MetadataError(
                f"config.json: {where}.thresholds names {rel!r}, which activation.targets does not select."
            )
        full[expected[rel]] = t
    missing = sorted(set(expected) - set(thresholds))
    if missing:
        raise MetadataError(f"config.json: {where}.thresholds has no threshold for {missing[:3]}.")
    return attach_thresholds(model, spec.method, full)
