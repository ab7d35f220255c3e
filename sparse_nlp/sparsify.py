"""`sparsify(model, config)`: apply a `SparsityConfig` to a transformers model in place; `to_dense` undoes it.

Every argument is checked before the model is touched: a bad config, an unsupported family, a target that
selects nothing, or a calibrated method without data raises and leaves the model unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from .activation.apply import calibrate_activation, check_activation, remove_activation
from .attention.apply import apply_attention, check_pattern, extend_for, remove_attention
from .config import SparsityConfig, WeightSparsity
from .errors import ConfigError, UnsupportedModelError
from .metadata import METADATA_KEY, read_metadata, write_metadata
from .pruning.calibration import check_calibration_plans, prune_with_calibration
from .pruning.experts import (
    ExpertPlan,
    check_expert_layout,
    detach_expert_masks,
    masked_experts,
    prune_experts,
    select_experts,
)
from .pruning.masking import detach_mask, masked_modules
from .pruning.methods import get_method
from .pruning.onloading import attach_store, block_store, check_offloadable
from .pruning.plan import LayerPlan, plan_weight_rules, prune_without_data  # noqa: F401  (LayerPlan: its earlier path)
from .structured import apply_structured
from .targets import (
    ModelTargets,
    base_relative_name,
    model_targets,
    use_targets,
)

logger = logging.getLogger(__name__)


def sparsify(
    model: nn.Module,
    config: SparsityConfig | dict[str, Any],
    *,
    data: Any = None,
    tokenizer: Any = None,
    num_samples: int = 128,
    seq_len: int = 128,
    progress: bool = True,
    targets: ModelTargets | dict[str, Any] | str | None = None,
    offload_dir: str | None = None,
) -> nn.Module:
    """Make `model` sparse as `config` says, in place, and record the config on ``model.config``.

    Args:
        model: A transformers model of a supported family (see `sparse_nlp.targets.TARGETS`).
        config: A `SparsityConfig` (or its dict form).
        data: Calibration data for methods that need it (a list of texts, a `datasets.Dataset` with a
            text column, or batches of token ids); unused by magnitude pruning.
        tokenizer: Tokenizer for text calibration data.
        num_samples: Calibration samples used (the first `num_samples` of `data`).
        seq_len: Calibration sequence length in tokens (longer texts are truncated).
        progress: Show progress bars.
        targets: The model's layout (a `ModelTargets`, its dict form or a JSON file), for a family outside
            the targets table or to override its entry (see `sparse_nlp.targets.use_targets`).
        offload_dir: Sequential onloading (`sparse_nlp.pruning.onloading`): the blocks live in safetensors files
            in this folder and are brought into memory one at a time to be calibrated and pruned, then written
            back. The model comes back with its blocks still on disk: `sparse_nlp.save_pretrained` saves it
            block by block, and `sparse_nlp.pruning.onloading.onload_all` brings it back into memory (needed
            before running it). A model from
            `sparse_nlp.pruning.onloading.load_offloaded` never holds more than one block.

    Returns:
        The same model, for chaining.

    Raises:
        ConfigError: a bad field (named in the message).
        UnsupportedModelError: the model's family has no targets-table entry.
        TargetError: a target matches no layer.
    """
    if isinstance(config, dict):
        config = SparsityConfig.from_dict(config)
    config.validate()
    if targets is not None:
        use_targets(model, targets)
    model_targets(model)  # unsupported families fail before anything changes
    previous = read_metadata(model.config)
    plans = plan_weight_rules(model, config.weights)
    already = {base_relative_name(model, n) for n, _ in masked_modules(model)}
    already.update(base_relative_name(model, n) for n, *_ in masked_experts(model))
    for plan in plans:
        if base_relative_name(model, plan.name) in already:
            raise ConfigError(
                f"{plan.name!r} is already pruned; call sparse_nlp.to_dense(model) first to start over."
            )
    experts = _plan_experts(model, config.weights, already)
    calibrated_experts = [e for e in experts if e.needs_data]
    # profile 'owl' weighs layers by activation outliers, so it needs calibration data even for magnitude
    needs_data = [p for p in plans if p.needs_data] + calibrated_experts
    if needs_data and data is None:
        what = f"pruning method {needs_data[0].method.name!r}"
        if not needs_data[0].method.needs_calibration:
            what = f"profile 'owl' (with method {needs_data[0].method.name!r})"
        raise ConfigError(
            f"{what} needs calibration data: pass data=[texts...] "
            "(and tokenizer=...) to sparsify, or --calibration on the command line."
        )
    if config.activation is not None:  # a method the family refuses, or no data, fails before any change
        check_activation(model, config.activation)
        if data is None:
            raise ConfigError(
                f"activation method {config.activation.method!r} needs calibration data: pass data=[texts...] "
                "(and tokenizer=...) to sparsify, or --calibration on the command line."
            )
    if needs_data:
        check_calibration_plans(plans)
    store = None
    if offload_dir is not None or getattr(model, "__dict__", {}).get("_sparse_nlp_block_store") is not None:
        check_offloadable(model, plans)
        if config.attention is not None or config.structured is not None or config.activation is not None:
            raise ConfigError(
                "offload_dir supports weight rules only (no attention, structured or activation part)."
            )
        if experts:
            raise ConfigError(
                "offload_dir does not prune fused mixture-of-experts parameters; exclude them or prune in memory."
            )
        store = attach_store(model, offload_dir) if offload_dir is not None else block_store(model)
    if config.attention is not None:
        check_pattern(model, config.attention)  # a pattern the family cannot use fails before any change
        extend_for(model, config.attention)  # before calibration, which may run past the old positions
    if config.structured is not None:
        apply_structured(model, config.structured, data=data, tokenizer=tokenizer, progress=progress)
        plans = plan_weight_rules(model, config.weights)  # removal may have swapped the Linear modules
    if needs_data:
        # experts pruned without data go first, as the Linear layers without data do: the calibrated layers see them
        prune_experts([e for e in experts if not e.needs_data])
        prune_with_calibration(
            model,
            plans,
            data,
            tokenizer=tokenizer,
            num_samples=num_samples,
            seq_len=seq_len,
            progress=progress,
            store=store,
            experts=calibrated_experts,
        )
    elif plans and store is not None:
        for i in tqdm(
            range(len(store.blocks)), desc="pruning (onloaded)", unit="block", disable=not progress
        ):
            block = store.onload(i)
            inside = {id(m) for m in block.modules()}
            prune_without_data([p for p in plans if id(p.module) in inside], False)
            store.offload(i)
    elif plans:
        prune_without_data(plans, progress)
    if experts and not needs_data:
        prune_experts(experts)
    if config.attention is not None:
        apply_attention(model, config.attention)

    extra = {}
    if config.activation is not None:  # calibrated on the model as pruned above
        extra["activation"] = calibrate_activation(
            model,
            config.activation,
            data,
            tokenizer=tokenizer,
            num_samples=num_samples,
            seq_len=seq_len,
            progress=progress,
        )
    merged = config if previous is None else _merge(previous, config)
    write_metadata(model, merged, **extra)
    logger.info("sparsified %d layers of %s", len(plans), type(model).__name__)
    return model


def _plan_experts(model: nn.Module, rules: list[WeightSparsity], already: set[str]) -> list[ExpertPlan]:
    """Each rule's fused expert parameters (mixture-of-experts families), checked before any change."""
    out: list[ExpertPlan] = []
    owner: dict[str, int] = {}
    for i, rule in enumerate(rules):
        chosen = select_experts(model, rule.targets, rule.exclude)
        if not chosen:
            continue
        for name in chosen:
            if name in owner:
                raise ConfigError(
                    f"weights[{i}] selects {name!r}, which weights[{owner[name]}] already prunes."
                )
            if base_relative_name(model, name) in already:
                raise ConfigError(f"{name!r} is already pruned; call sparse_nlp.to_dense(model) first.")
            owner[name] = i
        method = get_method(rule.method, rule.options)
        if rule.profile == "owl":
            raise UnsupportedModelError(
                f"weights[{i}]: profile 'owl' is not available on the experts of {model.config.model_type} (it weighs "
                "whole layers by their outliers, and an expert sees only its routed tokens); use profile 'uniform' for "
                "the experts, or exclude them (exclude: ['experts'])."
            )
        if method.needs_dense_inputs:
            raise UnsupportedModelError(
                f"weights[{i}]: {rule.method} option match_dense is not available on the experts of "
                f"{model.config.model_type}; drop the option or exclude the experts (exclude: ['experts'])."
            )
        if rule.scope == "global":
            raise ConfigError(
                f"weights[{i}].scope 'global' is not available on mixture-of-experts weights (each expert is pruned "
                "on its own); use per-layer or per-row, or exclude the experts (exclude: ['experts'])."
            )
        pattern = rule.parsed_pattern(f"weights[{i}]")
        for name, (module, param_name) in chosen.items():
            if method.needs_calibration:
                check_expert_layout(module, name)
            out.append(ExpertPlan(name, module, param_name, method, rule.sparsity, pattern, rule.scope))
    return out


def _merge(previous: SparsityConfig, new: SparsityConfig) -> SparsityConfig:
    merged = SparsityConfig(weights=[*previous.weights, *new.weights])
    for part in ("attention", "structured", "activation"):
        setattr(
            merged, part, getattr(new, part) if getattr(new, part) is not None else getattr(previous, part)
        )
    return merged


def to_dense(model: nn.Module) -> nn.Module:
    """Remove every trace of sparse_nlp: masks, hooks, metadata, activation thresholds and attention settings.
    Weights keep their values.

    Structurally pruned layers keep their smaller shapes (they are plain modules already).
    """
    remove_activation(model)
    for _, module in list(masked_modules(model)):
        detach_mask(module)
    for _, module, _, _ in list(masked_experts(model)):
        detach_expert_masks(module)
    if hasattr(model.config, METADATA_KEY):
        meta = getattr(model.config, METADATA_KEY)
        delattr(model.config, METADATA_KEY)
        if isinstance(meta, dict) and meta.get("config", {}).get("attention") is not None:
            remove_attention(model)
    return model
