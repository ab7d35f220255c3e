"""Where things live in each supported architecture: one table keyed by ``config.model_type``.

Library code never spells ``model.bert.encoder.layer`` or ``model.model.layers``; it asks this table.
Paths are relative to the model's *base model* (``model.base_model``), so the same entry serves
``BertModel`` and ``BertForSequenceClassification``.

A model outside the table gets an entry inferred from its modules (`sparse_nlp.targets_infer`), good for
weight sparsity only; a user can give an exact entry for their own model with `use_targets` (one model) or
`register_targets` (a ``model_type``). Each entry says which features it supports and, where not, why.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from torch import nn

from .config import TARGET_GROUPS
from .errors import TargetError, UnsupportedModelError
from .linear import is_prunable, is_transposed, linear_weight  # noqa: F401  (their earlier import path)
from .targets_infer import infer_layout

logger = logging.getLogger(__name__)

FEATURES = ("weights", "calibration", "structured", "attention")
"""Feature names of `ModelTargets.refusal` and of the support table: weight sparsity without data
(magnitude, any pattern), one-shot calibrated pruning (Wanda, SparseGPT, the OWL profile), structured
removal of heads and FFN neurons, and sparse attention patterns."""


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
        experts: Fused 3-D expert parameters of a mixture-of-experts block, relative to a block
            (``mlp.experts.gate_up_proj`` of shape (E, 2F, H), ``mlp.experts.down_proj`` (E, H, F)); each
            expert's slice is pruned and masked on its own. The router stays dense.
        no_structured: Why structured removal does not apply to the family ("" when it does).
        no_attention: Why sparse attention patterns do not apply to the family ("" when they do).
        no_calibration: Why calibrated one-shot pruning does not apply ("" when it does).
        inferred: The entry was inferred from module names, not written for the family.
    """

    layers: str
    o: str
    ffn_in: tuple[str, ...]
    ffn_out: str | None
    attention: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    causal: bool = False
    gated: bool = False
    experts: tuple[str, ...] = ()
    no_structured: str = ""
    no_attention: str = ""
    no_calibration: str = ""
    inferred: bool = False

    @property
    def attention_linears(self) -> tuple[str, ...]:
        return tuple(p for p in (self.q, self.k, self.v, self.qkv, self.o) if p)

    @property
    def ffn_linears(self) -> tuple[str, ...]:
        return tuple(p for p in (*self.ffn_in, self.ffn_out) if p)

    def refusal(self, feature: str) -> str:
        """Why `feature` (one of `FEATURES`) does not apply to this entry; ``""`` when it does."""
        if feature == "structured":
            return self.no_structured
        if feature == "attention":
            return self.no_attention
        if feature == "calibration":
            return self.no_calibration
        if feature == "weights":
            return ""
        raise KeyError(f"unknown feature {feature!r}; known: {', '.join(FEATURES)}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form read by `ModelTargets.from_dict` (and ``--targets-file``)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "targets") -> ModelTargets:
        """Build an entry from its JSON form; unknown or missing fields are named."""
        if not isinstance(data, dict):
            raise TargetError(f"{source}: expected a JSON object with the ModelTargets fields.")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise TargetError(f"{source}: unknown field(s) {unknown}; known: {', '.join(known)}.")
        missing = [n for n in ("layers", "o", "ffn_in", "ffn_out", "attention") if n not in data]
        if missing:
            raise TargetError(f"{source}: missing field(s) {missing}.")
        values = dict(data)
        for f in fields(cls):
            value = values.get(f.name)
            wanted = bool if f.name in ("causal", "gated", "inferred") else str
            if f.name not in ("ffn_in", "experts") and value is not None and not isinstance(value, wanted):
                raise TargetError(f"{source}: {f.name} must be a {wanted.__name__}, got {value!r:.60}.")
        for name in ("ffn_in", "experts"):
            if name in values:
                if isinstance(values[name], str) or not isinstance(values[name], list | tuple):
                    raise TargetError(f"{source}: {name} must be a list of module paths.")
                values[name] = tuple(values[name])
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> ModelTargets:
        """Read an entry from a JSON file (`to_dict`'s form)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise TargetError(f"targets file {path} does not exist.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TargetError(f"targets file {path} is not valid JSON: {err}") from None
        return cls.from_dict(data, source=str(path))

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

_PHI3 = ModelTargets(
    layers="layers",
    qkv="self_attn.qkv_proj",
    o="self_attn.o_proj",
    ffn_in=("mlp.gate_up_proj",),
    ffn_out="mlp.down_proj",
    attention="self_attn",
    causal=True,
    gated=True,
    no_structured=(
        "Phi-3 fuses q, k and v in qkv_proj (query and key/value parts of different sizes under GQA) and gate "
        "and up in gate_up_proj; head and neuron removal slices separate projections only"
    ),
)
_DEBERTA_V2 = ModelTargets(
    layers="encoder.layer",
    q="attention.self.query_proj",
    k="attention.self.key_proj",
    v="attention.self.value_proj",
    o="attention.output.dense",
    ffn_in=("intermediate.dense",),
    ffn_out="output.dense",
    attention="attention.self",
    no_structured=(
        "DeBERTa's disentangled attention projects relative positions with per-head weights shared across "
        "layers (pos_key_proj / pos_query_proj or the shared key/query); removing heads would have to slice them too"
    ),
    no_attention=(
        "DeBERTa computes its relative-position attention in its own module, not through transformers' "
        "attention functions, so a sparse pattern would not be applied"
    ),
)
_MODERNBERT = ModelTargets(
    layers="layers",
    qkv="attn.Wqkv",
    o="attn.Wo",
    ffn_in=("mlp.Wi",),
    ffn_out="mlp.Wo",
    attention="attn",
    gated=True,
    no_structured=(
        "ModernBERT fuses q, k and v in Wqkv and input and gate in Wi; head and neuron removal slices separate "
        "projections only"
    ),
    no_attention=(
        "ModernBERT alternates local (sliding-window) and global attention layers with its own per-layer "
        "masks; one sparse pattern for every layer would silently replace that design"
    ),
)


def _moe(shared_expert: bool) -> ModelTargets:
    """A Mixtral / Qwen-MoE block: Llama attention, fused 3-D experts, a dense router (``mlp.gate``)."""
    prefix = "mlp.shared_expert."
    why_experts = "experts are fused 3-D parameters (mlp.experts.gate_up_proj, mlp.experts.down_proj), not Linear layers"
    return replace(
        _LLAMA,
        ffn_in=(prefix + "gate_proj", prefix + "up_proj") if shared_expert else (),
        ffn_out=prefix + "down_proj" if shared_expert else None,
        experts=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        no_structured=f"{why_experts}; per-expert neuron removal is not implemented",
    )


TARGETS: dict[str, ModelTargets] = {
    "bert": _BERT,
    "roberta": _BERT,
    "electra": _BERT,
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
    "deberta-v2": _DEBERTA_V2,
    "modernbert": _MODERNBERT,
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
    "qwen3": _LLAMA,
    "olmo2": replace(
        _LLAMA,
        no_structured=(
            "OLMo 2 normalises the whole query and key projections (q_norm / k_norm over all heads at once), "
            "so removing a head changes the normalisation of the others"
        ),
    ),
    "gemma2": _LLAMA,  # soft-capped attention logits: sparse attention runs them on the reference kernel
    "gemma3_text": _LLAMA,
    "phi3": _PHI3,
    "mixtral": _moe(shared_expert=False),
    "qwen2_moe": _moe(shared_expert=True),
    "qwen3_moe": _moe(shared_expert=False),
}
"""The built-in entries by ``config.model_type`` (see `register_targets` to add one)."""

_MODEL_ATTR = "_sparse_nlp_targets"


def register_targets(model_type: str, entry: ModelTargets) -> None:
    """Add (or replace) the table entry of a ``model_type``, for every model of that type."""
    if not isinstance(entry, ModelTargets):
        raise TargetError(f"register_targets needs a ModelTargets, got {type(entry).__name__}.")
    TARGETS[model_type] = entry


def use_targets(model: nn.Module, entry: ModelTargets | dict[str, Any] | str | Path) -> ModelTargets:
    """Give one model its own entry (a `ModelTargets`, its dict form, or a JSON file); it wins over the table."""
    if isinstance(entry, str | Path):
        entry = ModelTargets.load(entry)
    elif isinstance(entry, dict):
        entry = ModelTargets.from_dict(entry)
    elif not isinstance(entry, ModelTargets):
        raise TargetError(
            f"targets must be a ModelTargets, a dict or a JSON file, got {type(entry).__name__}."
        )
    try:
        getattr(model, "base_model", model).get_submodule(entry.layers)
    except AttributeError:
        raise TargetError(
            f"targets.layers {entry.layers!r} is not a module of {type(model).__name__}'s base model."
        ) from None
    model.__dict__[_MODEL_ATTR] = entry
    return entry


def model_targets(model_or_type: nn.Module | str) -> ModelTargets:
    """The entry of a model: its own (`use_targets`), the table's, or one inferred from its modules.

    A ``model_type`` string gets the table's entry only. An inferred entry is logged once per model with a
    one-line notice; it serves weight sparsity, and refuses structured removal and attention patterns.
    """
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        own = model_or_type.__dict__.get(_MODEL_ATTR)
        if own is not None:
            return own
        config = getattr(model_or_type, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type is None:
            raise UnsupportedModelError(
                f"{type(model_or_type).__name__} has no config.model_type; sparse_nlp works on transformers models."
            )
    if model_type in TARGETS:
        return TARGETS[model_type]
    if isinstance(model_or_type, str):
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not in the targets table; in the table: {', '.join(sorted(TARGETS))}. "
            "Pass a model to infer its layout, or give one with sparse_nlp.targets.register_targets."
        )
    entry = ModelTargets(
        **infer_layout(model_or_type)
    )  # raises UnsupportedModelError with the reason when it cannot
    model_or_type.__dict__[_MODEL_ATTR] = entry
    logger.warning(
        "model_type %r is not in the targets table; using a layout inferred from its module names "
        "(blocks %r; weight sparsity only).",
        model_type,
        entry.layers,
    )
    return entry


def require(model: nn.Module, feature: str) -> ModelTargets:
    """The model's entry, or `UnsupportedModelError` saying why `feature` does not apply to its family."""
    entry = model_targets(model)
    reason = entry.refusal(feature)
    if reason:
        what = {
            "structured": "structured removal",
            "attention": "sparse attention",
            "calibration": "calibrated one-shot pruning",
        }.get(feature, feature)
        raise UnsupportedModelError(f"{what} is not available for {model.config.model_type}: {reason}.")
    return entry


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


def _reaches_experts(model: nn.Module, entry: ModelTargets, target: str) -> bool:
    if not entry.experts:
        return False
    if not target.startswith("re:"):
        return target in ("ffn", "all-linear")
    layer_re = re.compile(rf"^{re.escape(entry.layers)}\.\d+\.(.+)$")
    for name, _ in model.named_parameters():
        m = layer_re.match(base_relative_name(model, name))
        if m and m.group(1) in entry.experts and re.search(target[3:], name):
            return True
    return False


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
        if not hits and _reaches_experts(model, entry, target):
            continue  # the fused experts of a mixture-of-experts block (sparse_nlp.pruning.experts)
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
