"""MoEfication (Zhang et al., 2022) without fine-tuning: FFN neurons split into experts, a router picks a few per token.

Each targeted FFN's intermediate neurons are split into ``experts`` groups of (nearly) equal size by balanced
k-means on the rows of the FFN's first projection (the gate rows of a gated FFN): neurons whose input weights
point the same way share an expert. The *similarity* router scores expert e for a token x as ``x . c_e``, with
``c_e`` the mean of the expert's (unit-normalised) rows, and keeps the ``top_k`` best; the outputs of the other
experts' neurons are set to zero by a forward hook on the FFN's activation module (computed in full, then zeroed).
`sparse_nlp.activation.accelerate` skips them instead when decoding (one token): only the kept experts' rows of the
FFN's input projections are computed, and its output projection reads only the weight rows of nonzero inputs. The
expert map (neuron -> expert) is saved; the centroids are rebuilt from it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..linear import linear_weight


@torch.no_grad()
def balanced_split(rows: torch.Tensor, experts: int, *, iterations: int = 4, seed: int = 0) -> torch.Tensor:
    """(F, H) neuron rows -> (F,) expert index, each expert holding floor or ceil of F / experts neurons.

    Balanced k-means on unit-normalised rows (cosine similarity): each round assigns the (neuron, expert) pairs in
    order of decreasing similarity while the expert has room, then moves each centroid to its neurons' mean.
    """
    count = rows.shape[0]
    unit = nn.functional.normalize(rows.float(), dim=1)  # (F, H)
    g = torch.Generator().manual_seed(seed)
    centroids = unit[torch.randperm(count, generator=g)[:experts]].clone()  # (E, H)
    capacity = torch.full((experts,), count // experts, dtype=torch.long)
    capacity[: count % experts] += 1
    assign = torch.zeros(count, dtype=torch.long)
    for _ in range(iterations):
        scores = unit @ centroids.t()  # (F, E)
        order = torch.argsort(scores.reshape(-1), descending=True)
        left = capacity.tolist()
        chosen = [-1] * count  # Python lists: this loop visits up to F * E pairs
        remaining = count
        for flat in order.tolist():
            f, e = divmod(flat, experts)
            if chosen[f] >= 0 or left[e] == 0:
                continue
            chosen[f] = e
            left[e] -= 1
            remaining -= 1
            if remaining == 0:
                break
        assign = torch.tensor(chosen, dtype=torch.long)
        sums = torch.zeros_like(centroids).index_add_(0, assign, unit)  # every expert has neurons: E <= F
        centroids = nn.functional.normalize(sums, dim=1)  # the direction of each expert's mean row
    return assign


def neuron_rows(first: nn.Module, width: int) -> torch.Tensor:
    """(width, H): the input weights of the FFN's intermediate neurons (the first `width` rows of its first
    projection: the gate rows of a fused gate/up projection)."""
    return linear_weight(first).detach()[:width]


def centroids(rows: torch.Tensor, assign: torch.Tensor, experts: int) -> torch.Tensor:
    """(E, H) router centroids: the mean unit row of each expert."""
    unit = nn.functional.normalize(rows.float(), dim=1)
    out = torch.zeros(experts, rows.shape[1])
    out.index_add_(0, assign, unit)
    return out / torch.bincount(assign, minlength=experts).clamp(min=1).unsqueeze(1)


class ExpertRouter:
    """The hooks of one FFN: the first projection's input picks the experts, the activation output is zeroed."""

    def __init__(
        self, first: nn.Module, act: nn.Module, assign: torch.Tensor, experts: int, top_k: int
    ) -> None:
        width = assign.numel()
        self.first = first
        self.assign = assign
        self.top_k = top_k
        self.experts = experts
        # (H, E): the router centroids, transposed for scoring tokens
        self.centroids_t = centroids(neuron_rows(first, width), assign, experts).t().contiguous()
        # whether act(0) = 0: then neurons whose projection is skipped stay zero on their own
        with torch.no_grad():
            self.act_keeps_zero = bool(act(torch.zeros(1)).eq(0).all())
        self.keep: torch.Tensor | None = None
        self.handles = [
            first.register_forward_pre_hook(self._route),
            act.register_forward_hook(self._zero),
        ]

    def choose(self, x: torch.Tensor) -> torch.Tensor:
        """(..., H) tokens -> (..., k) the experts each token keeps (the best `top_k` scores ``x . c_e``)."""
        scores = x.float() @ self.centroids_t.to(x.device)  # (..., E)
        return scores.topk(self.top_k, dim=-1).indices

    def route(self, x: torch.Tensor, chosen: torch.Tensor | None = None) -> None:
        """Decide the kept neurons of tokens `x` (..., H) for the activation hook (`chosen`: the experts, if known)."""
        if self.top_k >= self.experts:
            self.keep = None
            return
        if chosen is None:
            chosen = self.choose(x)
        experts = torch.zeros(*chosen.shape[:-1], self.experts, dtype=torch.bool, device=x.device)
        experts.scatter_(-1, chosen, True)  # (..., E)
        self.keep = experts[..., self.assign.to(x.device)]  # (..., F)

    def _route(self, module: nn.Module, args: tuple) -> None:
        self.route(args[0])

    def _zero(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        keep, self.keep = self.keep, None
        if keep is None or keep.shape != out.shape:
            return out
        return torch.where(keep, out, torch.zeros((), dtype=out.dtype, device=out.device))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
