"""Thresholds from calibration data: per-site histograms of activation magnitudes and their quantiles.

Each site (a Linear input for TEAL, a gate activation output for CATS) gets a histogram of ``log2 |x|`` over the
real (non-padding) tokens of the calibration batches, with `BINS` bins over [`LOG2_MIN`, `LOG2_MAX`] plus a count
of exact zeros. The threshold for a sparsity ``s`` is the ``s``-quantile of ``|x|``, interpolated inside its bin
(log-scale bins of 0.8% width: the fraction zeroed is off by far less than a point). The histograms are fixed-size,
so memory does not grow with the amount of calibration data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

LOG2_MIN, LOG2_MAX, BINS = -40.0, 24.0, 8192
"""Histogram range of log2 |x| and its bin count."""


def real_tokens(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """The (n, features) rows of `x` (B, T, F) on real tokens; every row when there is no matching mask."""
    if token_mask is not None and x.dim() == 3 and x.shape[:2] == token_mask.shape:
        return x[token_mask]
    return x.reshape(-1, x.shape[-1])


@dataclass
class Histogram:
    """Counts of ``log2 |x|`` in `BINS` bins, plus exact zeros, over every value a site saw."""

    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(BINS, dtype=torch.float64))
    zeros: int = 0
    total: int = 0

    def add(self, values: torch.Tensor) -> None:
        v = values.detach().abs().float().reshape(-1)  # (n,)
        nonzero = v[v > 0]
        self.zeros += int(v.numel() - nonzero.numel())
        self.total += int(v.numel())
        logs = torch.log2(nonzero).clamp_(LOG2_MIN, LOG2_MAX)
        self.counts += torch.histc(logs, bins=BINS, min=LOG2_MIN, max=LOG2_MAX).double()

    def threshold(self, sparsity: float) -> float:
        """The magnitude t such that a fraction `sparsity` of the values seen has ``|x| <= t`` (0.0 at sparsity 0)."""
        if sparsity <= 0.0 or self.total == 0:
            return 0.0
        want = sparsity * self.total - self.zeros
        if want <= 0:
            return 0.0
        cumulative = torch.cumsum(self.counts, 0)  # (BINS,)
        i = int(torch.searchsorted(cumulative, torch.tensor(want, dtype=torch.float64)))
        i = min(i, BINS - 1)
        before = float(cumulative[i - 1]) if i > 0 else 0.0
        inside = float(self.counts[i])
        frac = (want - before) / inside if inside > 0 else 1.0
        width = (LOG2_MAX - LOG2_MIN) / BINS
        return float(2.0 ** (LOG2_MIN + (i + min(max(frac, 0.0), 1.0)) * width))

    def fraction_below(self, threshold: float) -> float:
        """The fraction of the values seen with ``|x| <= threshold`` (from the histogram)."""
        if self.total == 0:
            return 0.0
        if threshold <= 0.0:
            return self.zeros / self.total
        width = (LOG2_MAX - LOG2_MIN) / BINS
        pos = (math.log2(threshold) - LOG2_MIN) / width
        i = int(min(max(pos, 0.0), BINS))
        below = float(self.counts[:i].sum())
        if i < BINS:
            below += float(self.counts[i]) * min(max(pos - i, 0.0), 1.0)
        return (self.zeros + below) / self.total


class SiteHooks:
    """Hooks that feed each site's thresholded tensor (input or output) to a callback with the token mask."""

    def __init__(
        self,
        sites: dict[str, nn.Module],
        where: str,
        callback: Callable[[str, torch.Tensor], None],
    ) -> None:
        self.token_mask: torch.Tensor | None = None
        self._handles = []
        for name, module in sites.items():
            if where == "input":

                def pre(module: nn.Module, args: tuple, name: str = name) -> None:
                    callback(name, real_tokens(args[0], self.token_mask))

                self._handles.append(module.register_forward_pre_hook(pre))
            else:

                def post(module: nn.Module, args: tuple, out: Any, name: str = name) -> None:
                    callback(name, real_tokens(out, self.token_mask))

                self._handles.append(module.register_forward_hook(post))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def run_batches(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], hooks: SiteHooks | None = None
) -> None:
    """Run the model over calibration batches (no cache), telling `hooks` each batch's real tokens."""
    extra = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if hooks is not None:
                hooks.token_mask = batch["attention_mask"].bool().to(device)
            model(**{k: v.to(device) for k, v in batch.items()}, **extra)
    finally:
        model.train(was_training)


def histograms(
    model: nn.Module, sites: dict[str, nn.Module], where: str, batches: list[dict[str, torch.Tensor]]
) -> dict[str, Histogram]:
    """One `Histogram` per site over the calibration batches (one forward pass per batch)."""
    out = {name: Histogram() for name in sites}
    hooks = SiteHooks(sites, where, lambda name, x: out[name].add(x))
    try:
        run_batches(model, batches, hooks)
    finally:
        hooks.remove()
    return out


def zero_fractions(
    model: nn.Module, sites: dict[str, nn.Module], where: str, batches: list[dict[str, torch.Tensor]]
) -> tuple[dict[str, float], float]:
    """Measured fraction of exact zeros in each site's tensor as the model now runs (thresholds applied), and the
    fraction over all sites' values together."""
    zeros = dict.fromkeys(sites, 0)
    total = dict.fromkeys(sites, 0)

    def count(name: str, x: torch.Tensor) -> None:
        zeros[name] += int((x == 0).sum())
        total[name] += x.numel()

    hooks = SiteHooks(sites, where, count)
    try:
        run_batches(model, batches, hooks)
    finally:
        hooks.remove()
    per_site = {n: zeros[n] / total[n] if total[n] else 0.0 for n in sites}
    overall = sum(zeros.values()) / max(1, sum(total.values()))
    return per_site, overall
