"""`report(model)`: measured sparsity per Linear layer and totals per group (attention, ffn, other).

Everything is counted from the weights themselves (exact zeros), not from the config, so the report says
what the model really is. Activation sparsity (TEAL, CATS) depends on the input, so its figure is the one measured
on the calibration data when the thresholds were calibrated (recorded in the model's metadata).
"""

from __future__ import annotations

import json
import weakref
from dataclasses import asdict, dataclass, field

from torch import nn

from .activation.apply import activation_record
from .pruning.experts import SUFFIX, select_experts
from .pruning.masking import get_mask
from .pruning.offloaded import named_modules_onloaded
from .targets import UnsupportedModelError, is_prunable, model_targets, module_group


@dataclass
class ModuleRow:
    name: str
    group: str
    shape: tuple[int, ...]
    numel: int
    nonzeros: int
    masked: bool

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.numel if self.numel else 0.0


@dataclass
class GroupTotal:
    numel: int = 0
    nonzeros: int = 0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.numel if self.numel else 0.0


@dataclass
class SparsityReport:
    """Per-module rows and totals. ``str(report)`` is a table; `to_dict` gives JSON-ready data.

    Attributes:
        rows: One row per Linear layer of the model.
        groups: Totals for ``attention``, ``ffn``, ``other`` (Linear layers outside the blocks, e.g. heads),
            ``linear`` (all Linear layers) and ``model`` (every parameter of the model).
    """

    rows: list[ModuleRow] = field(default_factory=list)
    groups: dict[str, GroupTotal] = field(default_factory=dict)
    activation: dict | None = None
    """Activation sparsity measured on the calibration data: ``method``, ``sparsity`` (fraction of the thresholded
    values that were zero), ``weight_weighted`` (the same weighted by the size of the weight each value multiplies:
    the fraction of weight reads a batch-1 kernel skips), ``sites``, ``tokens``; None without activation sparsity."""

    def to_dict(self) -> dict:
        out = {
            "modules": [{**asdict(r), "shape": list(r.shape), "sparsity": r.sparsity} for r in self.rows],
            "groups": {g: {**asdict(t), "sparsity": t.sparsity} for g, t in self.groups.items()},
        }
        if self.activation is not None:
            out["activation"] = dict(self.activation)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.rows] + [6])
        lines = [f"{'module':<{width}}  {'group':<9}  {'shape':<12}  {'nonzeros':>10}  {'sparsity':>8}  mask"]
        for r in self.rows:
            shape = "x".join(map(str, r.shape))
            lines.append(
                f"{r.name:<{width}}  {r.group:<9}  {shape:<12}  {r.nonzeros:>10,}  {r.sparsity:>8.2%}  {'yes' if r.masked else ''}"
            )
        lines.append("")
        lines.append(f"{'group':<9}  {'params':>12}  {'nonzeros':>12}  {'sparsity':>8}")
        for g, t in self.groups.items():
            lines.append(f"{g:<9}  {t.numel:>12,}  {t.nonzeros:>12,}  {t.sparsity:>8.2%}")
        if self.activation is not None:
            a = self.activation
            lines.append("")
            lines.append(
                f"activation sparsity ({a['method']}, {a['sites']} sites): {a['sparsity']:.2%} of the thresholded "
                f"values zero ({a['weight_weighted']:.2%} weighted by the weights they multiply), measured on "
                f"{a['tokens']:,} calibration tokens"
            )
        return "\n".join(lines)


def _expert_rows(model: nn.Module) -> list[ModuleRow]:
    """One row per fused expert parameter (E, out, in) of a mixture-of-experts family; none for others."""
    try:
        experts = select_experts(model, ["all-linear"])
    except UnsupportedModelError:
        return []
    rows = []
    for name, (module, param_name) in experts.items():
        w = module._parameters[param_name].detach()
        rows.append(
            ModuleRow(
                name=name,
                group="ffn",
                shape=tuple(w.shape),
                numel=w.numel(),
                nonzeros=int((w != 0).sum()),
                masked=module._buffers.get(param_name + SUFFIX) is not None,
            )
        )
    return rows


def report(model: nn.Module) -> SparsityReport:
    """Measure the sparsity of every Linear layer of a transformers model and total it per group.

    Any model works: families in the targets table get ``attention`` / ``ffn`` groups, others have every
    Linear layer in ``other`` (the counts are the same; only the grouping needs the table).
    """
    try:
        model_targets(model)
        group_of = module_group
    except UnsupportedModelError:

        def group_of(model: nn.Module, name: str) -> str:
            return "other"

    out = SparsityReport()
    totals = {g: GroupTotal() for g in ("attention", "ffn", "other", "linear", "model")}
    # Tied weights count once. A model whose blocks are on disk (sequential onloading) is read one block
    # at a time and each block's tensors are freed before the next is read, so a bare id() could be
    # reused by a later tensor; the weak reference tells a tied weight from a new one at a reused address.
    seen: dict[int, weakref.ref] = {}
    for name, module in named_modules_onloaded(model):
        for p in module.parameters(recurse=False):
            known = seen.get(id(p))
            if known is not None and known() is p:
                continue
            seen[id(p)] = weakref.ref(p)
            totals["model"].numel += p.numel()
            totals["model"].nonzeros += int((p.detach() != 0).sum())
        if not is_prunable(module):
            continue
        w = module.weight.detach()
        row = ModuleRow(
            name=name,
            group=group_of(model, name),
            shape=tuple(w.shape),
            numel=w.numel(),
            nonzeros=int((w != 0).sum()),
            masked=get_mask(module) is not None,
        )
        out.rows.append(row)
        for g in (row.group, "linear"):
            totals[g].numel += row.numel
            totals[g].nonzeros += row.nonzeros
    for row in _expert_rows(model):  # fused 3-D experts of mixture-of-experts blocks count as FFN weights
        out.rows.append(row)
        for g in ("ffn", "linear"):
            totals[g].numel += row.numel
            totals[g].nonzeros += row.nonzeros
    out.groups = {g: t for g, t in totals.items() if t.numel}
    out.activation = activation_summary(model)
    return out


def activation_summary(model: nn.Module) -> dict | None:
    """The activation sparsity measured on the calibration data (from the model's metadata), or None."""
    record = activation_record(model)
    if not isinstance(record, dict) or not isinstance(record.get("measured"), dict):
        return None
    measured = record["measured"]
    return {
        "method": record.get("method"),
        "sparsity": float(measured.get("sparsity", 0.0)),
        "weight_weighted": float(measured.get("weight_weighted", measured.get("sparsity", 0.0))),
        "sites": len(record.get("thresholds") or {}),
        "tokens": int(measured.get("tokens", 0)),
    }


def measured_sparsity(model: nn.Module) -> dict[str, float]:
    """Fractions of zeros measured on the weights: transformer blocks (attention + FFN Linear) and all Linear."""
    groups = report(model).groups
    blocks = [groups[g] for g in ("attention", "ffn") if g in groups]
    numel = sum(g.numel for g in blocks)
    nonzeros = sum(g.nonzeros for g in blocks)
    return {
        "block_sparsity": round(1.0 - nonzeros / numel, 4) if numel else 0.0,
        "linear_sparsity": round(groups["linear"].sparsity, 4) if "linear" in groups else 0.0,
    }
