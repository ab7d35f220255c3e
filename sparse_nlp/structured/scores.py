"""Importance of attention heads and FFN neurons, and the choice of which to remove.

Three scores, registered in `sparse_nlp.registry.STRUCTURED_SCORES`:

- ``weight-norm``: the L2 norm of every weight that belongs to the unit (its q/k/v rows and output
  columns; its FFN input rows and output column). Needs no data.
- ``taylor``: first-order Taylor estimate of the loss change when the unit is removed, accumulated over
  batches as ``sum_batches |sum_{w in unit} w * dL/dw|`` over the unit's output-projection weights. For a
  gate ``g`` multiplying the unit's output, ``dL/dg`` equals exactly that sum, so this is the head-importance
  score of Michel et al. (2019) and the neuron score of Molchanov et al. (2019).
- ``movement``: ``-sum_steps sum_{w in unit} w * dL/dw`` (Sanh et al., 2020, summed over a unit), accumulated
  during fine-tuning with `MovementTracker`; as a one-shot score it accumulates over the given batches.

Selection (`select_units`) is a pure function of the scores: per-layer budgets remove
``floor(f * n + 0.5)`` units in every block; a global budget removes that many units of the whole model,
lowest scores first, after dividing each layer's scores by their L2 norm (``normalize``, on by default),
since raw scores of different layers are not on the same scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..registry import STRUCTURED_SCORES
from ..targets import is_transposed, model_targets
from .removal import EmptyAttention, LayerLayout, blocks, model_layout

Scores = dict[int, torch.Tensor]
"""Block index -> one score per unit, shape (units,)."""


@dataclass
class UnitScores:
    """Importance of every head unit and FFN neuron (higher = more important)."""

    heads: Scores = field(default_factory=dict)
    ffn: Scores = field(default_factory=dict)


# ---- pure reductions from weight-shaped tensors to unit scores ------------------------------------------


def _oi(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor of `module` as (out, in)."""
    return tensor.t() if is_transposed(module) else tensor


def head_sums(o_values: torch.Tensor, layout: LayerLayout) -> torch.Tensor:
    """Sum a (out, in) tensor shaped like the output projection over each head unit's input columns.

    Args:
        o_values: (hidden, num_heads * head_dim).
        layout: The block's layout (head_dim, group size).

    Returns:
        (head_units,) sums.
    """
    per_head = o_values.reshape(o_values.shape[0], layout.num_heads, layout.head_dim).sum(dim=(0, 2))  # (nh,)
    return per_head.reshape(layout.head_units, layout.group_size).sum(1)  # (units,)


def row_head_sums(values: torch.Tensor, layout: LayerLayout, kv: bool) -> torch.Tensor:
    """Sum a (rows, in) tensor shaped like q (``kv=False``) or k/v (``kv=True``) over each head unit's rows."""
    heads = layout.num_kv_heads if kv else layout.num_heads
    per_head = values.reshape(heads, layout.head_dim, -1).sum(dim=(1, 2))  # (heads,)
    return per_head if kv else per_head.reshape(layout.head_units, layout.group_size).sum(1)


def _qkv_parts(model: nn.Module, block: nn.Module, tensor_of) -> list[tuple[torch.Tensor, bool]]:
    """(values (rows, in), is_kv) for q, k and v of a block; GPT-2's fused c_attn is split in three."""
    entry = model_targets(model)
    if entry.qkv is not None:
        module = block.get_submodule(entry.qkv)
        q, k, v = _oi(module, tensor_of(module)).chunk(3, dim=0)
        return [(q, False), (k, True), (v, True)]
    parts = []
    for path, kv in ((entry.q, False), (entry.k, True), (entry.v, True)):
        module = block.get_submodule(path)
        parts.append((_oi(module, tensor_of(module)), kv))
    return parts


def _has_heads(model: nn.Module, block: nn.Module, layout: LayerLayout) -> bool:
    return layout.num_heads > 0 and not isinstance(
        block.get_submodule(model_targets(model).attention), EmptyAttention
    )


@torch.no_grad()
def weight_norm_scores(model: nn.Module) -> UnitScores:
    """L2 norm of all weights of each unit (no data needed)."""
    entry = model_targets(model)
    out = UnitScores()
    for block, layout in zip(blocks(model), model_layout(model)):
        i = layout.index
        if _has_heads(model, block, layout):
            o = block.get_submodule(entry.o)
            sq = head_sums(_oi(o, o.weight).pow(2), layout)
            for values, kv in _qkv_parts(model, block, lambda m: m.weight.pow(2)):
                sq = sq + row_head_sums(values, layout, kv)
            out.heads[i] = sq.sqrt()
        else:
            out.heads[i] = torch.zeros(0)
        sq = torch.zeros(layout.ffn)
        for path in entry.ffn_in:
            m = block.get_submodule(path)
            sq = sq + _oi(m, m.weight).pow(2).sum(1)
        down = block.get_submodule(entry.ffn_out)
        out.ffn[i] = (sq + _oi(down, down.weight).pow(2).sum(0)).sqrt()
    return out


def gradient_unit_sums(model: nn.Module) -> UnitScores:
    """``sum_{w in unit} w * dL/dw`` over each unit's output-projection weights, from the current ``.grad``.

    This is dL/dg for a gate g on the unit's output (a head's context slice, a neuron's activation).
    """
    entry = model_targets(model)
    out = UnitScores()
    with torch.no_grad():
        for block, layout in zip(blocks(model), model_layout(model)):
            i = layout.index
            if _has_heads(model, block, layout):
                o = block.get_submodule(entry.o)
                grad = o.weight.grad if o.weight.grad is not None else torch.zeros_like(o.weight)
                out.heads[i] = head_sums(_oi(o, o.weight * grad), layout)
            else:
                out.heads[i] = torch.zeros(0)
            down = block.get_submodule(entry.ffn_out)
            grad = down.weight.grad if down.weight.grad is not None else torch.zeros_like(down.weight)
            out.ffn[i] = _oi(down, down.weight * grad).sum(0)
    return out


# ---- batches and losses -----------------------------------------------------------------------------------


def _is_causal_lm(model: nn.Module) -> bool:
    return model_targets(model).causal and hasattr(model, "lm_head")


def _loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The model's own loss; without labels, LM labels for causal LMs and the model's predictions otherwise."""
    batch = dict(batch)
    if "labels" not in batch:
        if _is_causal_lm(model):
            labels = batch["input_ids"].clone()
            if "attention_mask" in batch:
                labels[batch["attention_mask"] == 0] = -100
            batch["labels"] = labels
        else:
            with torch.no_grad():
                logits = getattr(model(**batch), "logits", None)
            if logits is None:
                raise ValueError(
                    f"{type(model).__name__} has no task head; taylor/movement scores need one "
                    "(e.g. AutoModelForSequenceClassification or AutoModelForCausalLM), or use score='weight-norm'."
                )
            batch["labels"] = logits.argmax(-1)  # pseudo-labels: the sensitivity of the model's own decision
    output = model(**batch)
    if getattr(output, "loss", None) is None:
        raise ValueError(
            f"{type(model).__name__} returned no loss; taylor/movement scores need a model with a task head "
            "(e.g. AutoModelForSequenceClassification or AutoModelForCausalLM)."
        )
    return output.loss


def make_batches(
    data: Any,
    tokenizer: Any = None,
    *,
    batch_size: int = 16,
    seq_len: int = 128,
    num_batches: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Batches of model inputs from texts (needs `tokenizer`), a `datasets.Dataset` with a ``text`` column,
    or an iterable of ready dicts of tensors (used as they are).

    Args:
        data: Texts, a dataset, or batches.
        tokenizer: Tokenizer for text data.
        batch_size: Texts per batch.
        seq_len: Maximum tokens per text (longer ones are truncated).
        num_batches: Keep at most this many batches.
    """
    if data is None:
        raise ValueError(
            "this structured score needs data: pass data=[texts...] and tokenizer=..., or batches of tensors."
        )
    if hasattr(data, "column_names") and "text" in data.column_names:
        data = list(data["text"])
    batches: list[dict[str, torch.Tensor]] = []
    items = list(data) if not isinstance(data, list) else data
    if items and isinstance(items[0], str):
        if tokenizer is None:
            raise ValueError("text data for a structured score needs tokenizer=...")
        if (
            getattr(tokenizer, "pad_token", None) is None
            and getattr(tokenizer, "eos_token", None) is not None
        ):
            tokenizer.pad_token = tokenizer.eos_token
        for start in range(0, len(items), batch_size):
            enc = tokenizer(
                items[start : start + batch_size],
                truncation=True,
                max_length=seq_len,
                padding=True,
                return_tensors="pt",
            )
            batches.append(dict(enc))
    else:
        batches = [dict(b) for b in items]
    return batches[:num_batches] if num_batches else batches


def accumulate_gradient_scores(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, absolute: bool, progress: bool = False
) -> UnitScores:
    """Sum over batches of the per-unit ``w * grad`` sums: absolute per batch (Taylor) or signed and negated (movement).

    The model is run in eval mode (no dropout); its training flag, requires_grad flags and ``.grad`` are restored.
    """
    was_training = model.training
    grads_before = {n: p.grad for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()
    total: UnitScores | None = None
    try:
        for p in model.parameters():
            p.requires_grad_(True)
        batches = list(batches)
        for batch in tqdm(batches, desc="structured scores", unit="batch", disable=not progress):
            model.zero_grad(set_to_none=True)
            _loss(model, batch).backward()
            sums = gradient_unit_sums(model)
            step = UnitScores(
                heads={i: (s.abs() if absolute else -s) for i, s in sums.heads.items()},
                ffn={i: (s.abs() if absolute else -s) for i, s in sums.ffn.items()},
            )
            total = step if total is None else _add(total, step)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = grads_before[n]
        model.train(was_training)
    if total is None:
        raise ValueError("no batches were given for a gradient-based structured score.")
    return total


def _add(a: UnitScores, b: UnitScores) -> UnitScores:
    return UnitScores(
        heads={i: a.heads[i] + b.heads[i] for i in a.heads}, ffn={i: a.ffn[i] + b.ffn[i] for i in a.ffn}
    )


class MovementTracker:
    """Accumulates movement scores during fine-tuning: call `update()` after each ``backward()``.

    Example:
        >>> tracker = MovementTracker(model)
        >>> loss.backward(); tracker.update(); optimizer.step()
        >>> remove = select_units(tracker.scores().heads, 0.5, "global")
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.total: UnitScores | None = None
        self.steps = 0

    def update(self) -> None:
        sums = gradient_unit_sums(self.model)
        step = UnitScores(
            heads={i: -s for i, s in sums.heads.items()}, ffn={i: -s for i, s in sums.ffn.items()}
        )
        self.total = step if self.total is None else _add(self.total, step)
        self.steps += 1

    def scores(self) -> UnitScores:
        if self.total is None:
            raise ValueError("MovementTracker.update() was never called; there are no movement scores yet.")
        return self.total


# ---- registered scores -------------------------------------------------------------------------------------


@dataclass
class ScoreContext:
    """What a score function may use: data, tokenizer and the batching options."""

    data: Any = None
    tokenizer: Any = None
    batch_size: int = 16
    seq_len: int = 128
    num_batches: int | None = 8
    progress: bool = False


@STRUCTURED_SCORES.register("weight-norm")
def _weight_norm(model: nn.Module, ctx: ScoreContext) -> UnitScores:
    return weight_norm_scores(model)


@STRUCTURED_SCORES.register("taylor")
def _taylor(model: nn.Module, ctx: ScoreContext) -> UnitScores:
    batches = make_batches(
        ctx.data, ctx.tokenizer, batch_size=ctx.batch_size, seq_len=ctx.seq_len, num_batches=ctx.num_batches
    )
    return accumulate_gradient_scores(model, batches, absolute=True, progress=ctx.progress)


@STRUCTURED_SCORES.register("movement")
def _movement(model: nn.Module, ctx: ScoreContext) -> UnitScores:
    batches = make_batches(
        ctx.data, ctx.tokenizer, batch_size=ctx.batch_size, seq_len=ctx.seq_len, num_batches=ctx.num_batches
    )
    return accumulate_gradient_scores(model, batches, absolute=False, progress=ctx.progress)


# ---- selection -----------------------------------------------------------------------------------------------


def num_removed(fraction: float, total: int) -> int:
    """Units removed for a fraction: ``floor(f * n + 0.5)`` (the rounding rule of `sparse_nlp.pruning.masks`)."""
    return min(total, int(math.floor(fraction * total + 0.5)))


def select_units(
    scores: Scores, fraction: float, scope: str = "global", *, min_keep: int = 0, normalize: bool = True
) -> dict[int, list[int]]:
    """Which units to remove: the lowest-scored ones, per layer or over the whole model.

    Args:
        scores: Block index -> (units,) scores (higher = more important).
        fraction: Fraction of all units to remove, in [0, 1).
        scope: ``per-layer`` (the fraction in every block) or ``global`` (the fraction of the model's units).
        min_keep: Units every block keeps at least (global scope; 0 allows emptying a block).
        normalize: Divide each block's scores by their L2 norm before a global ranking.

    Returns:
        Block index -> sorted unit indices to remove (every block present, possibly empty).
    """
    if scope not in ("per-layer", "global"):
        raise ValueError(f"scope must be per-layer or global, got {scope!r}.")
    remove: dict[int, list[int]] = {i: [] for i in scores}
    if scope == "per-layer":
        for i, s in scores.items():
            k = min(num_removed(fraction, len(s)), max(0, len(s) - min_keep))
            remove[i] = sorted(torch.argsort(s.double(), stable=True)[:k].tolist())
        return remove
    entries = []  # (score, layer, unit)
    for i, s in scores.items():
        s = s.double()
        if normalize and len(s):
            s = s / s.norm().clamp_min(1e-30)
        entries.extend((float(v), i, u) for u, v in enumerate(s.tolist()))
    k = num_removed(fraction, len(entries))
    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    left = {i: len(s) for i, s in scores.items()}
    taken = 0
    for _, i, u in entries:
        if taken == k:
            break
        if left[i] <= min_keep:
            continue
        remove[i].append(u)
        left[i] -= 1
        taken += 1
    return {i: sorted(v) for i, v in remove.items()}
