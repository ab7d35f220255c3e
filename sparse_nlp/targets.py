"""Where things live in each supported architecture: one table keyed by ``config.model_type``.

Library code never spells ``model.bert.encoder.layer`` or ``model.model.layers``; it asks this table.
Paths are relative to the model's *base model* (``model.base_model``), so the same entry serves
``BertModel`` and ``BertForSequenceClassification``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import TARGET_GROUPS


class UnsupportedModelError(ValueError):
    """The model's ``model_type`` has no entry in the targets table."""


class TargetError(ValueError):
    """A target selection that matches nothing or names an unknown group."""


@dataclass(frozen=True)
class ModelTargets:
    """Module paths of one architecture, inside each repeated block (layer).

    Attributes:
        layers: Path of the ModuleList of blocks, relative to the base model (e.g. ``encoder.layer``).
        q, k, v: Query / key / value projections, relative to a block (``None`` when fused in ``qkv``).
        qkv: Fused query-key-value projection (GPT-2's ``c_attn``), or ``None``.
        o: Attention output projection.
        ffn_in: FFN input projections (gate and up for gated MLPs).
        ffn_out: FFN output projection.
        attention: The attention module of a block (holds the head count at run time).
        causal: Whether the family is a causal decoder.
        gated: Whether the FFN is gated (``down(act(gate(x)) * up(x))``).
    """

    layers: str
    o: str
    ffn_in: tuple[str, ...]
    ffn_out: str
    attention: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    causal: bool = False
    gated: bool = False

    @property
    def attention_linears(self) -> tuple[str, ...]:
        return tuple(p for p in (self.q, self.k, self.v, self.qkv, self.o) if p)

    @property
    def ffn_linears(self) -> tuple[str, ...]:
        return (*self.ffn_in, self.ffn_out)

    def group(self, name: str) -> tuple[str, ...]:
        if name == "attention":
            return self.attention_linears
        if name == "ffn":
            return self.ffn_linears
        if name == "all-linear":
            return self.attention_linears + self.ffn_linears
        raise TargetError(f"unknown target group {name!r}; known groups: {', '.join(TARGET_GROUPS)}.")


_BERT = ModelTargets(
    layers="encoder.layer",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    o="attention.output.dense",
    ffn_in=("intermediate.dense",),
    ffn_out="output.dense",
    attention="attention.self",
)
_LLAMA = ModelTargets(
    layers="layers",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    ffn_in=("mlp.gate_proj", "mlp.up_proj"),
    ffn_out="mlp.down_proj",
    attention="self_attn",
    causal=True,
    gated=True,
)

TARGETS: dict[str, ModelTargets] = {
    "bert": _BERT,
    "roberta": _BERT,
    "distilbert": ModelTargets(
        layers="transformer.layer",
        q="attention.q_lin",
        k="attention.k_lin",
        v="attention.v_lin",
        o="attention.out_lin",
        ffn_in=("ffn.lin1",),
        ffn_out="ffn.lin2",
        attention="attention",
    ),
    "gpt2": ModelTargets(
        layers="h",
        qkv="attn.c_attn",
        o="attn.c_proj",
        ffn_in=("mlp.c_fc",),
        ffn_out="mlp.c_proj",
        attention="attn",
        causal=True,
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
}


def model_targets(model_or_type: nn.Module | str) -> ModelTargets:
    """The targets-table entry of a model (or of a ``model_type`` string)."""
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        config = getattr(model_or_type, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type is None:
            raise UnsupportedModelError(
                f"{type(model_or_type).__name__} has no config.model_type; sparse_nlp works on transformers models."
            )
    try:
        return TARGETS[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(TARGETS))}. "
            "Use explicit 're:<regex>' targets only on a supported family, or add an entry to sparse_nlp.targets.TARGETS."
        ) from None


def is_prunable(module: nn.Module) -> bool:
    """Linear-like layers whose weight the pruning methods understand."""
    return isinstance(module, nn.Linear | Conv1D)


def is_transposed(module: nn.Module) -> bool:
    """Whether the layer stores its weight as (in_features, out_features) (GPT-2's Conv1D)."""
    return isinstance(module, Conv1D)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the layer stores (a view, writable in place)."""
    return module.weight.t() if is_transposed(module) else module.weight


def base_relative_name(model: nn.Module, name: str) -> str:
    """A module name relative to ``model.base_model`` when it lies inside it (our checkpoint metadata form)."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and getattr(model, "base_model", model) is not model and name.startswith(prefix + "."):
        return name[len(prefix) + 1 :]
    return name


def resolve_module(model: nn.Module, relative_name: str) -> nn.Module:
    """Inverse of `base_relative_name`: find a module by its base-relative (or full) name."""
    base = getattr(model, "base_model", model)
    for root in (base, model):
        try:
            return root.get_submodule(relative_name)
        except AttributeError:
            continue
    raise KeyError(f"module {relative_name!r} not found in {type(model).__name__}")


def layer_index(model: nn.Module, name: str) -> int | None:
    """The block index of a module name, or None when it is outside the repeated blocks."""
    entry = model_targets(model)
    m = re.match(rf"^{re.escape(entry.layers)}\.(\d+)\.", base_relative_name(model, name))
    return int(m.group(1)) if m else None


def module_group(model: nn.Module, name: str) -> str:
    """``attention``, ``ffn`` or ``other`` for a module name (used by reports)."""
    entry = model_targets(model)
    rel = base_relative_name(model, name)
    m = re.match(rf"^{re.escape(entry.layers)}\.\d+\.(.+)$", rel)
    if m:
        if m.group(1) in entry.attention_linears:
            return "attention"
        if m.group(1) in entry.ffn_linears:
            return "ffn"
    return "other"


def select_modules(
    model: nn.Module, targets: list[str] | str, exclude: list[str] | tuple[str, ...] = ()
) -> dict[str, nn.Module]:
    """Prunable modules selected by groups and ``re:`` regexes, minus ``exclude`` regexes.

    Args:
        model: A transformers model of a family in `TARGETS`.
        targets: Group names (``attention``, ``ffn``, ``all-linear``) and/or ``"re:<regex>"`` strings, the
            regex searched in the full module name (as ``model.named_modules()`` gives it).
        exclude: Regexes; matching modules are left out.

    Returns:
        Full module name -> module, in model order.

    Raises:
        TargetError: when a target selects no prunable module, or a module whose weight is shared with the
            input embeddings (a tied ``lm_head``: pruning it would silently prune the embeddings too).
    """
    entry = model_targets(model)
    if isinstance(targets, str):
        targets = [targets]
    named = [(n, m) for n, m in model.named_modules() if is_prunable(m)]
    chosen: set[str] = set()
    for target in targets:
        if target.startswith("re:"):
            try:
                regex = re.compile(target[3:])
            except re.error as err:
                raise TargetError(f"target {target!r} is not a valid regex: {err}") from None
            hits = [n for n, _ in named if regex.search(n)]
        else:
            suffixes = entry.group(target)
            layer_re = re.compile(rf"^{re.escape(entry.layers)}\.\d+\.(.+)$")
            hits = []
            for n, _ in named:
                m = layer_re.match(base_relative_name(model, n))
                if m and m.group(1) in suffixes:
                    hits.append(n)
        if not hits:
            raise TargetError(
                f"target {target!r} matches no Linear layer of this {model.config.model_type} model "
                f"({type(model).__name__}). Example layer names: {', '.join(n for n, _ in named[:4])}."
            )
        chosen.update(hits)
    excludes = [re.compile(x) for x in exclude]
    selected = {n: m for n, m in named if n in chosen and not any(x.search(n) for x in excludes)}
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    shared = getattr(embeddings, "weight", None)
    for name, module in selected.items():
        if shared is not None and getattr(module, "weight", None) is shared:
            raise TargetError(
                f"{name}.weight is tied to the input embeddings (tie_word_embeddings=True): pruning it would "
                f"prune the embeddings too. Leave it out (exclude: ['{re.escape(name)}$']) or untie the weights "
                "first."
            )
    return selected
