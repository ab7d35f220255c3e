"""TEAL's greedy allocation: per block, spend the sparsity budget where the block output changes least.

For each block, on the block inputs of a few calibration samples (captured from the dense model), every site starts
at sparsity 0; each step tries raising each site by ``step`` (its threshold read from its calibration histogram)
and keeps the raise that gives the smallest relative error of the block output against the dense block, until the
parameter-weighted mean sparsity of the block's sites reaches the target. Sites that read the same tensor (q, k and
v; gate and up) move together, as in TEAL. Sites outside the repeated blocks keep the uniform target.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..targets import layer_index, model_targets
from .calibrate import Histogram, run_batches


def _block_inputs(
    model: nn.Module, blocks: nn.ModuleList, batch: dict[str, torch.Tensor]
) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) each block is called with on `batch` in the dense model."""
    captured: list[tuple[tuple, dict] | None] = [None] * len(blocks)
    handles = []
    for i, block in enumerate(blocks):

        def pre(module: nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
            captured[i] = (args, dict(kwargs))

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        run_batches(model, [batch])
    finally:
        for handle in handles:
            handle.remove()
    return [c for c in captured if c is not None]


def _shared_inputs(
    model: nn.Module, sites: dict[str, nn.Module], batch: dict[str, torch.Tensor]
) -> dict[str, str]:
    """Site name -> the first site that reads the same input tensor in one forward pass (itself when alone)."""
    seen: dict[str, torch.Tensor] = {}  # the tensors themselves: kept alive, so identity is meaningful
    handles = []
    for name, module in sites.items():

        def pre(module: nn.Module, args: tuple, name: str = name) -> None:
            seen.setdefault(name, args[0])

        handles.append(module.register_forward_pre_hook(pre))
    try:
        run_batches(model, [batch])
    finally:
        for handle in handles:
            handle.remove()
    out: dict[str, str] = {}
    leaders: list[str] = []
    for name in sites:
        found = next((n for n in leaders if name in seen and seen.get(n) is seen[name]), None)
        if found is None:
            leaders.append(name)
        out[name] = found or name
    return out


def _output(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def greedy_sparsities(
    model: nn.Module,
    sites: dict[str, nn.Module],
    hists: dict[str, Histogram],
    target: float,
    step: float,
    batches: list[dict[str, torch.Tensor]],
    *,
    samples: int = 4,
    progress: bool = True,
) -> dict[str, float]:
    """Site name -> its sparsity (Linear-input sites only), whose parameter-weighted mean per block is `target`."""
    entry = model_targets(model)
    blocks = getattr(model, "base_model", model).get_submodule(entry.layers)
    first = {k: v[:samples] for k, v in batches[0].items()}
    inputs = _block_inputs(model, blocks, first)
    leader = _shared_inputs(model, sites, {k: v[:1] for k, v in first.items()})
    out = dict.fromkeys(sites, float(target))
    by_block: dict[int, list[str]] = {}
    for name in sites:
        i = layer_index(model, name)
        if i is not None:
            by_block.setdefault(i, []).append(name)
    current: dict[str, float] = {}

    def pre(module: nn.Module, args: tuple, name: str = "") -> tuple:
        x = args[0]
        return (torch.where(x.abs() > current[name], x, torch.zeros((), dtype=x.dtype)), *args[1:])

    for i in tqdm(sorted(by_block), desc="greedy allocation", unit="block", disable=not progress):
        members: dict[str, list[str]] = {}
        for n in by_block[i]:
            members.setdefault(leader[n], []).append(n)
        names = list(members)  # one entry per group of sites reading the same input
        args, kwargs = inputs[i]
        weights = {n: float(sum(sites[m].weight.numel() for m in members[n])) for n in names}
        total = sum(weights.values())
        level = dict.fromkeys(names, 0.0)
        current.update(dict.fromkeys(names, 0.0))
        handles = [sites[n].register_forward_pre_hook(lambda m, a, n=n: pre(m, a, n)) for n in names]
        try:
            reference = _output(blocks[i], args, kwargs)
            scale = float((reference.float() ** 2).sum()) or 1.0
            while sum(weights[n] * level[n] for n in names) < target * total - 1e-9:
                spent = sum(weights[n] * level[n] for n in names)
                best: tuple[float, str, float] | None = None
                for n in names:
                    if level[n] >= 0.99:
                        continue
                    raise_by = min(step, (target * total - spent) / weights[n], 0.99 - level[n])
                    trial = level[n] + raise_by
                    current[n] = hists[n].threshold(trial)
                    err = float(((_output(blocks[i], args, kwargs) - reference).float() ** 2).sum()) / scale
                    current[n] = hists[n].threshold(level[n])
                    if best is None or err < best[0]:
                        best = (err, n, trial)
                if best is None:
                    break
                _, n, trial = best
                level[n] = trial
                current[n] = hists[n].threshold(trial)
        finally:
            for handle in handles:
                handle.remove()
        for n in names:
            out.update(dict.fromkeys(members[n], level[n]))
    return out


__all__: list[str] = ["greedy_sparsities"]
