"""`GradualPruner`: the pruning state shared by the Trainer callback and the accelerate loop.

It resolves weight rules (`WeightSparsity`, with method ``magnitude`` for gradual magnitude pruning or
``movement``) to layers through the targets table, and at every update step of a `CubicSchedule` recomputes
the keep-masks at the scheduled sparsity. Masks live on the modules (`sparse_nlp.pruning.masking`), so any
optimizer keeps the pruned weights at zero between updates. After the schedule's end step the masks are
frozen. The fused experts of mixture-of-experts blocks (`sparse_nlp.pruning.experts`) are pruned by magnitude
the same way, each expert slice on its own at the scheduled sparsity.

Movement scores are learnable tensors held here (not on the model, so checkpoints stay plain): a gradient
hook on each pruned weight accumulates ``dL/dW' * W`` (straight-through estimator) and `score_step` moves
the scores with their own Adam optimizer after each optimizer step. Under data parallel training the score
gradients are averaged across processes, so every process keeps the same masks.

The whole state (position in the schedule, masks, scores, the scores' optimizer) saves to and loads from a
folder (`save` / `load`), which is how runs resume from a checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import SparsityConfig, WeightSparsity
from ..errors import ConfigError, UnsupportedModelError
from ..metadata import read_metadata, write_metadata
from ..pruning.experts import SUFFIX, ExpertPlan, attach_expert_mask, select_experts
from ..pruning.masking import attach_mask, detach_mask, get_mask, is_sharded
from ..pruning.masks import global_masks, select_mask
from ..pruning.methods import get_method
from ..pruning.movement import (
    MovementOptions,
    MovementPruning,
    initial_scores,
    l1_gradient,
    score_gradient,
    soft_mask,
)
from ..pruning.plan import LayerPlan, plan_weight_rules
from ..pruning.schedules import CubicSchedule
from ..targets import is_transposed, linear_weight

logger = logging.getLogger(__name__)

STATE_FILE = "sparse_pruner.json"
TENSORS_FILE = "sparse_pruner.safetensors"


def _oi(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor in the module's weight layout, as (out, in)."""
    return tensor.t() if is_transposed(module) else tensor


class GradualPruner:
    """Prunes a model step by step during training, following a cubic schedule.

    Build it on the unwrapped model **before** training starts (before ``Trainer.train()`` or
    ``accelerator.prepare``), then call `step` after every optimizer step (the callback and the accelerate
    loop do this).

    Args:
        model: A transformers model of a supported family.
        config: The weight rules: a `SparsityConfig`, a list of `WeightSparsity`, or a dict. Each rule's
            ``sparsity`` is the final sparsity (unless the schedule sets ``final_sparsity``). Methods:
            ``magnitude`` (gradual magnitude pruning) and ``movement``; every pattern and scope of one-shot
            pruning is accepted. A rule that reaches fused mixture-of-experts parameters must be ``magnitude``
            with scope ``per-layer`` or ``per-row`` (each expert slice is pruned on its own).
        schedule: When masks change (`CubicSchedule`).

    Example:
        >>> pruner = GradualPruner(model, SparsityConfig.magnitude(0.9), CubicSchedule(end_step=800, update_every=50))
        >>> trainer = Trainer(model=model, ..., callbacks=[SparsityCallback(pruner)])
    """

    def __init__(
        self,
        model: nn.Module,
        config: SparsityConfig | list[WeightSparsity] | dict[str, Any],
        schedule: CubicSchedule,
    ) -> None:
        if isinstance(config, dict):
            config = SparsityConfig.from_dict(config)
        elif isinstance(config, list):
            config = SparsityConfig(weights=config)
        config.validate()
        if not config.weights:
            raise ConfigError("weights is empty: gradual pruning needs at least one weight rule.")
        if config.attention is not None or config.structured is not None:
            raise ConfigError(
                "gradual pruning handles weight rules only; apply attention/structured parts with sparsify."
            )
        schedule.validate()
        self.model = model
        self.config = config
        self.schedule = schedule
        self.plans: list[LayerPlan] = plan_weight_rules(model, config.weights)
        self.expert_plans: list[ExpertPlan] = self._plan_experts(model, config.weights)
        self.applied_step: int | None = None
        self.scores: dict[str, torch.Tensor] = {}
        self._score_grads: dict[str, torch.Tensor] = {}
        self._backups: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []
        self._score_optimizer: torch.optim.Optimizer | None = None
        self._init_movement()
        previous = read_metadata(model.config)
        if previous is not None:  # a rule over the same layers (an earlier pruning stage) is superseded
            kept = [
                w
                for w in previous.weights
                if all((w.targets, w.exclude) != (r.targets, r.exclude) for r in config.weights)
            ]
            previous.weights = [*kept, *config.weights]
        write_metadata(model, previous if previous is not None else config)

    @staticmethod
    def _plan_experts(model: nn.Module, rules: list[WeightSparsity]) -> list[ExpertPlan]:
        """The fused mixture-of-experts parameters each rule selects (gradual magnitude pruning per expert slice)."""
        plans: list[ExpertPlan] = []
        for i, rule in enumerate(rules):
            chosen = select_experts(model, rule.targets, rule.exclude)
            if not chosen:
                continue
            if rule.method != "magnitude":
                raise UnsupportedModelError(
                    f"weights[{i}] selects the fused experts of {model.config.model_type}: gradual pruning of experts "
                    f"takes method 'magnitude' only, not {rule.method!r}; prune the experts in their own magnitude rule "
                    "(targets: ['re:experts']) and add exclude: ['experts'] to this one."
                )
            if rule.scope == "global":
                raise ConfigError(
                    f"weights[{i}].scope 'global' is not available on mixture-of-experts weights (each expert is "
                    "pruned on its own); use per-layer or per-row, or exclude the experts (exclude: ['experts'])."
                )
            method = get_method(rule.method, rule.options)
            pattern = rule.parsed_pattern(f"weights[{i}]")
            for name, (module, param_name) in chosen.items():
                plans.append(ExpertPlan(name, module, param_name, method, rule.sparsity, pattern, rule.scope))
        return plans

    # ---- movement scores ---------------------------------------------------------------------------------
    def _movement_plans(self) -> list[LayerPlan]:
        return [p for p in self.plans if isinstance(p.method, MovementPruning)]

    def _init_movement(self) -> None:
        groups = []
        for plan in self._movement_plans():
            opts: MovementOptions = plan.method.options
            weight_oi = linear_weight(plan.module)
            score = initial_scores(weight_oi, opts).requires_grad_(True)  # (out, in)
            self.scores[plan.name] = score
            self._score_grads[plan.name] = torch.zeros_like(score)
            self._backups[plan.name] = weight_oi.detach().clone()
            groups.append({"params": [score], "lr": opts.score_lr})
            module = plan.module
            # our hook must see the unmasked gradient dL/dW', so it goes before the mask's own gradient hook
            mask = get_mask(module)
            if mask is not None:
                detach_mask(module)
            self._hooks.append(module.weight.register_hook(self._grad_hook(plan)))
            if mask is not None:
                attach_mask(module, mask)
        if groups:
            self._score_optimizer = torch.optim.Adam(groups)

    def _follow_weights(self) -> None:
        """Keep the movement state on the weights' device: a Trainer moves the model (to a GPU) after the
        pruner is built, and the scores, their gradients, backups and Adam state must follow it."""
        plans = self._movement_plans()
        if not plans or not self.scores:
            return
        device = plans[0].module.weight.device
        if self.scores[plans[0].name].device == device:
            return
        with torch.no_grad():
            for store in (self.scores, self._score_grads, self._backups):
                for tensor in store.values():
                    tensor.data = tensor.data.to(device)
            if self._score_optimizer is not None:
                for state in self._score_optimizer.state.values():
                    for key, value in state.items():
                        if torch.is_tensor(value) and key != "step":
                            state[key] = value.to(device)

    def _grad_hook(self, plan: LayerPlan):
        name, module = plan.name, plan.module

        def hook(grad: torch.Tensor) -> torch.Tensor:
            if grad.device != self._score_grads[name].device:  # the model was moved since the last call
                self._follow_weights()
            weight_oi = linear_weight(module).detach()
            mask = get_mask(module)
            if mask is not None:  # pruned weights count with the value they had when pruned
                weight_oi = torch.where(_oi(module, mask), weight_oi, self._backups[name])
            self._score_grads[name].add_(score_gradient(_oi(module, grad), weight_oi))
            return grad

        return hook

    def score_step(self) -> None:
        """Move the movement scores by their accumulated gradients (call once after each optimizer step)."""
        if self._score_optimizer is None:
            return
        self._follow_weights()
        grads = [self._score_grads[p.name] for p in self._movement_plans()]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            for g in grads:
                torch.distributed.all_reduce(g)
                g.div_(world)
        for plan in self._movement_plans():
            score, grad = self.scores[plan.name], self._score_grads[plan.name]
            l1 = plan.method.options.l1
            score.grad = grad + l1_gradient(score.detach(), l1) if l1 > 0 else grad.clone()
            grad.zero_()
        self._score_optimizer.step()
        self._score_optimizer.zero_grad(set_to_none=True)

    # ---- masks -------------------------------------------------------------------------------------------
    def after_optimizer_step(self, global_step: int) -> bool:
        """The pruning step every training loop runs after an optimizer step: move the movement scores, then
        bring the masks to the schedule at `global_step` (`SparsityCallback` and `train_loop` both call it).

        Returns:
            True when the masks changed.
        """
        self.score_step()
        return self.step(global_step)

    def step(self, global_step: int) -> bool:
        """Bring the masks to the schedule at `global_step`; returns True when they changed.

        Idempotent: masks are recomputed once per update step, and never after the end step.
        """
        update = self.schedule.last_update(global_step)
        if update is None or update == self.applied_step:
            return False
        self._update_masks(update)
        self.applied_step = update
        return True

    @torch.no_grad()
    def _update_masks(self, step: int) -> None:
        movement = self._movement_plans()
        if movement and is_sharded(movement[0].module.weight):
            raise ConfigError(
                "movement pruning of sharded (FSDP) parameters is not supported: its scores follow the gradient of "
                "each whole weight. Use method magnitude, or data parallelism instead of FSDP."
            )
        self._follow_weights()
        by_rule: dict[int, list[LayerPlan]] = {}
        for plan in self.plans:
            by_rule.setdefault(id(plan.rule), []).append(plan)
        for group in by_rule.values():
            rule = group[0].rule
            sparsity = self.schedule.sparsity_at(step, rule.sparsity)
            scores = {p.name: self._scores_of(p) for p in group}
            if isinstance(group[0].method, MovementPruning) and group[0].method.options.variant == "soft":
                masks = {p.name: soft_mask(scores[p.name], p.method.options.threshold) for p in group}
            elif rule.scope == "global":
                masks = global_masks(scores, sparsity)
            else:
                masks = {p.name: select_mask(scores[p.name], sparsity, p.pattern, rule.scope) for p in group}
            for p in group:
                self._set_mask(p, masks[p.name])
            logger.info(
                "step %d: %s pruning of %d layers at sparsity %.4f", step, rule.method, len(group), sparsity
            )
        for plan in self.expert_plans:  # each expert slice (out, in) on its own
            sparsity = self.schedule.sparsity_at(step, plan.sparsity)
            param = plan.module._parameters[plan.param_name]  # (E, out, in)
            masks = [
                select_mask(plan.method.score(param[e], None), sparsity, plan.pattern, plan.scope)
                for e in range(param.shape[0])
            ]
            attach_expert_mask(plan.module, plan.param_name, torch.stack(masks))  # (E, out, in)
        if self.expert_plans:
            logger.info(
                "step %d: magnitude pruning of %d fused expert parameters", step, len(self.expert_plans)
            )

    def _scores_of(self, plan: LayerPlan) -> torch.Tensor:
        if plan.name in self.scores:
            return self.scores[plan.name].detach()
        weight = linear_weight(plan.module)
        # FSDP2: score the whole weight (gathered), so every process picks the same mask
        if is_sharded(weight):
            weight = weight.full_tensor()
        return plan.method.score(weight, None)

    def _set_mask(self, plan: LayerPlan, mask_oi: torch.Tensor) -> None:
        module = plan.module
        if plan.name in self._backups:  # movement: remember pruned values, restore revived ones
            weight_oi = linear_weight(module)
            old = get_mask(module)
            old_oi = torch.ones_like(mask_oi) if old is None else _oi(module, old)
            newly_pruned = old_oi & ~mask_oi
            revived = ~old_oi & mask_oi
            self._backups[plan.name][newly_pruned] = weight_oi[newly_pruned]
            weight_oi[revived] = self._backups[plan.name][revived]
        attach_mask(module, _oi(module, mask_oi))

    def masks(self) -> dict[str, torch.Tensor]:
        """Current keep-masks: (out, in) by module name, and (E, out, in) by fused expert parameter name (those
        without a mask yet are left out)."""
        out = {}
        for plan in self.plans:
            mask = get_mask(plan.module)
            if mask is not None:
                out[plan.name] = _oi(plan.module, mask).clone()
        for expert in self.expert_plans:
            mask = expert.module._buffers.get(expert.param_name + SUFFIX)
            if mask is not None:
                out[expert.name] = mask.clone()
        return out

    def sparsity(self) -> float:
        """Measured fraction of zeros in the masks of the pruned layers (0 before the first update)."""
        masks = self.masks()
        total = sum(m.numel() for m in masks.values())
        return 0.0 if total == 0 else sum(int((~m).sum()) for m in masks.values()) / total

    def finish(self) -> None:
        """Drop the movement scores and their hooks (masks stay). Call when training is over."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self.scores.clear()
        self._score_grads.clear()
        self._backups.clear()
        self._score_optimizer = None

    # ---- state ------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write the pruning state (schedule position, masks, scores, the scores' optimizer) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for name, mask in self.masks().items():
            tensors[f"mask/{name}"] = mask.to(torch.uint8).contiguous()
        for name, score in self.scores.items():
            tensors[f"score/{name}"] = score.detach().contiguous()
            tensors[f"backup/{name}"] = self._backups[name].contiguous()
        optim_steps: dict[str, float] = {}
        if self._score_optimizer is not None:
            state = self._score_optimizer.state
            for name, score in self.scores.items():
                if score in state:
                    tensors[f"adam_avg/{name}"] = state[score]["exp_avg"].contiguous()
                    tensors[f"adam_sq/{name}"] = state[score]["exp_avg_sq"].contiguous()
                    optim_steps[name] = float(state[score]["step"])
        if tensors:  # written under a temporary name and renamed: a kill never leaves half a file
            save_file(tensors, str(directory / f".{TENSORS_FILE}.tmp"))
            os.replace(directory / f".{TENSORS_FILE}.tmp", directory / TENSORS_FILE)
        meta = {
            "applied_step": self.applied_step,
            "schedule": vars(self.schedule),
            "config": self.config.to_dict(),
            "score_optimizer_steps": optim_steps,
        }
        (directory / f".{STATE_FILE}.tmp").write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(directory / f".{STATE_FILE}.tmp", directory / STATE_FILE)  # last: marks the state complete

    def load(self, directory: str | Path) -> None:
        """Restore a state written by `save` (the model's weights are loaded separately)."""
        directory = Path(directory)
        state_path = directory / STATE_FILE
        if not state_path.is_file():
            raise FileNotFoundError(f"no pruning state in {str(directory)!r}: looked for {state_path}.")
        meta = json.loads(state_path.read_text())
        tensors = load_file(str(directory / TENSORS_FILE)) if (directory / TENSORS_FILE).is_file() else {}
        names = {p.name for p in self.plans} | {e.name for e in self.expert_plans}
        stored = {k.split("/", 1)[1] for k in tensors if k.startswith("mask/")}
        if stored - names:
            raise ConfigError(
                f"{state_path}: masks for layers this pruner does not prune: {sorted(stored - names)[:4]}."
            )
        with torch.no_grad():
            for name, score in self.scores.items():
                if f"score/{name}" in tensors:
                    score.copy_(tensors[f"score/{name}"])
                    self._backups[name].copy_(tensors[f"backup/{name}"])
            for plan in self.plans:
                key = f"mask/{plan.name}"
                if key in tensors:
                    attach_mask(plan.module, _oi(plan.module, tensors[key].bool()))
            for expert in self.expert_plans:
                key = f"mask/{expert.name}"
                if key in tensors:
                    attach_expert_mask(expert.module, expert.param_name, tensors[key].bool())
        if self._score_optimizer is not None:
            for name, steps in meta.get("score_optimizer_steps", {}).items():
                score = self.scores[name]
                self._score_optimizer.state[score] = {
                    "step": torch.tensor(steps),
                    "exp_avg": tensors[f"adam_avg/{name}"].to(score.device, copy=True),
                    "exp_avg_sq": tensors[f"adam_sq/{name}"].to(score.device, copy=True),
                }
        self._follow_weights()
        self.applied_step = meta["applied_step"]
