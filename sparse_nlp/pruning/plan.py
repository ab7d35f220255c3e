"""Which layers a weight-sparsity config prunes, at which budget, and pruning them without data.

Shared by `sparse_nlp.sparsify` (one-shot), `sparse_nlp.pruning.calibration` (the calibration pass) and
`sparse_nlp.training.GradualPruner` (training-aware pruning): each resolves the rules of a
`SparsityConfig` to `LayerPlan` items here, so "which layers, which budgets" is decided in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import WeightSparsity
from ..errors import ConfigError
from ..targets import is_transposed, linear_weight, select_modules
from .masking import attach_mask
from .masks import global_masks
from .methods import PruningMethod, get_method
from .patterns import Pattern


@dataclass
class LayerPlan:
    """One layer to prune: what the calibration pass and the selection step need to know."""

    name: str
    module: nn.Module
    rule: WeightSparsity
    method: PruningMethod
    sparsity: float
    pattern: Pattern

    @property
    def needs_data(self) -> bool:
        """Whether pruning this layer needs calibration data: its method does, or the OWL profile does."""
        return self.method.needs_calibration or self.rule.profile == "owl"


def plan_weight_rules(model: nn.Module, rules: list[WeightSparsity]) -> list[LayerPlan]:
    """Resolve each rule to its layers; a layer chosen by two rules is an error."""
    plans: list[LayerPlan] = []
    owner: dict[str, int] = {}
    for i, rule in enumerate(rules):
        method = get_method(rule.method, rule.options)
        pattern = rule.parsed_pattern(f"weights[{i}]")
        for name, module in select_modules(model, rule.targets, rule.exclude).items():
            if name in owner:
                raise ConfigError(
                    f"weights[{i}] selects {name!r}, which weights[{owner[name]}] already prunes; "
                    "give each layer to one rule (use 'exclude')."
                )
            owner[name] = i
            plans.append(LayerPlan(name, module, rule, method, rule.sparsity, pattern))
    return plans


def attach_oi(module: nn.Module, mask_oi: torch.Tensor, new_weight_oi: torch.Tensor | None) -> None:
    """Attach an (out, in) mask (and optional new (out, in) weight) in the module's own weight layout."""
    if new_weight_oi is not None:
        with torch.no_grad():
            linear_weight(module).copy_(new_weight_oi)
    attach_mask(module, mask_oi.t() if is_transposed(module) else mask_oi)


def prune_without_data(plans: list[LayerPlan], progress: bool) -> None:
    """Prune layers whose method needs no data; a rule with a global budget is solved over all its layers."""
    by_rule: dict[int, list[LayerPlan]] = {}
    for plan in plans:
        by_rule.setdefault(id(plan.rule), []).append(plan)
    for group in by_rule.values():
        rule = group[0].rule
        if rule.scope == "global":
            scores = {p.name: p.method.score(linear_weight(p.module), None) for p in group}
            masks = global_masks(scores, rule.sparsity)
            for p in group:
                attach_oi(p.module, masks[p.name], None)
            continue
        for p in tqdm(
            group, desc=f"{rule.method} pruning", unit="layer", disable=not progress or len(group) < 2
        ):
            mask, new_weight = p.method.prune_layer(
                linear_weight(p.module), p.sparsity, p.pattern, rule.scope, None
            )
            attach_oi(p.module, mask, new_weight)
