"""A `ModelTargets` entry inferred from a model's modules, for a ``model_type`` outside the targets table.

The blocks are the largest ``ModuleList`` of identical blocks in the base model; inside the first block the
Linear layers are sorted into attention and FFN by their common names (``q_proj``, ``query``, ``qkv_proj``,
``gate_proj``, ``fc1``, ``dense`` under ``attention`` or ``intermediate`` ...), and the head counts read from
the config are checked against the projection sizes. An inferred entry serves weight sparsity (every
method and pattern); structured removal and attention patterns need an exact entry and refuse it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import UnsupportedModelError
from .linear import is_prunable, linear_weight

_Q = {"q_proj", "query", "q_lin", "q", "query_proj", "wq", "q_linear"}
_K = {"k_proj", "key", "k_lin", "k", "key_proj", "wk", "k_linear"}
_V = {"v_proj", "value", "v_lin", "v", "value_proj", "wv", "v_linear"}
_QKV = {"qkv_proj", "qkv", "wqkv", "c_attn", "query_key_value", "in_proj", "w_pack"}
_O = {"o_proj", "out_proj", "o", "out_lin", "wo_attn", "o_linear", "dense_out"}
_FFN_IN = {"gate_proj", "up_proj", "gate_up_proj", "fc1", "w1", "w3", "c_fc", "lin1", "wi", "wi_0", "wi_1"}
_FFN_IN.update({"dense_h_to_4h", "fc_in", "intermediate_dense"})
_FFN_OUT = {"down_proj", "fc2", "w2", "lin2", "dense_4h_to_h", "fc_out", "output_dense"}
_AMBIGUOUS = {"dense", "c_proj", "wo", "proj", "out"}
"""Leaf names whose role depends on the path: ``attention.output.dense`` is the attention output,
``intermediate.dense`` an FFN input, ``output.dense`` / ``mlp.c_proj`` / ``mlp.Wo`` the FFN output."""

_NOT_EXACT = (
    "the layout is inferred from module names; give an exact entry with sparse_nlp.targets.use_targets"
)

_ATTENTION_WORDS = ("attn", "attention")
_FFN_WORDS = (
    "mlp",
    "ffn",
    "feed_forward",
    "feedforward",
    "intermediate",
    "dense_relu_dense",
    "densereludense",
)


def find_blocks(base: nn.Module) -> str:
    """Path (relative to `base`) of the largest ``ModuleList`` whose children are all of one class."""
    best: tuple[int, int, str] | None = None
    for name, module in base.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or not name:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        key = (size, len(module), name)
        if best is None or key[:2] > best[:2]:
            best = key
    if best is None:
        raise UnsupportedModelError(
            f"cannot infer the layout of {type(base).__name__}: it has no ModuleList of identical blocks. "
            "Give one with sparse_nlp.targets.use_targets (or --targets-file), or use 're:<regex>' targets."
        )
    return best[2]


def _role(path: str) -> str | None:
    """``q``, ``k``, ``v``, ``qkv``, ``o``, ``ffn_in``, ``ffn_out`` or None for a block-relative Linear path."""
    parts = path.lower().split(".")
    leaf, parents = parts[-1], parts[:-1]
    in_attention = any(w in p for p in parents for w in _ATTENTION_WORDS)
    in_ffn = any(w in p for p in parents for w in _FFN_WORDS)
    for names, role in ((_Q, "q"), (_K, "k"), (_V, "v"), (_QKV, "qkv"), (_O, "o")):
        if leaf in names:
            return role
    if leaf in _FFN_IN:
        return "ffn_in"
    if leaf in _FFN_OUT:
        return "ffn_out"
    if leaf in _AMBIGUOUS:
        if in_attention:
            return "o"
        if any("intermediate" in p for p in parents):
            return "ffn_in"
        if in_ffn or any("output" in p for p in parents):
            return "ffn_out"
    return None


def _common_parent(paths: list[str]) -> str:
    split = [p.split(".")[:-1] for p in paths]
    prefix: list[str] = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) != 1:
            break
        prefix.append(parts[0])
    return ".".join(prefix)


def infer_layout(model: nn.Module) -> dict[str, Any]:
    """The fields of a `sparse_nlp.targets.ModelTargets` entry inferred for `model` (a transformers model), or
    `UnsupportedModelError` saying what is missing."""
    base = getattr(model, "base_model", model)
    layers = find_blocks(base)
    block = base.get_submodule(layers)[0]
    linears = {n: m for n, m in block.named_modules() if is_prunable(m)}
    roles: dict[str, list[str]] = {}
    for name in linears:
        role = _role(name)
        if role is not None:
            roles.setdefault(role, []).append(name)
    model_type = getattr(model.config, "model_type", "?")
    one = {r: v[0] for r, v in roles.items() if len(v) == 1}
    has_qkv = "qkv" in one or all(r in one for r in ("q", "k", "v"))
    missing = [
        what
        for what, ok in (
            ("query/key/value projections", has_qkv),
            ("attention output projection", "o" in one),
            ("FFN input projection", bool(roles.get("ffn_in"))),
            ("FFN output projection", "ffn_out" in one),
        )
        if not ok
    ]
    if missing:
        raise UnsupportedModelError(
            f"cannot infer the layout of model_type {model_type!r}: no single {', '.join(missing)} found among the "
            f"Linear layers of {layers}.0 ({', '.join(linears) or 'none'}). Give one with "
            "sparse_nlp.targets.use_targets (or --targets-file), or use 're:<regex>' targets."
        )
    _check_heads(model, linears, one)
    attention_paths = [one[r] for r in ("q", "k", "v", "qkv") if r in one]
    # the module holding the projections (a fused qkv's parent)
    attention = (
        _common_parent(attention_paths) if len(attention_paths) > 1 else attention_paths[0].rpartition(".")[0]
    )
    fused = "qkv" in one
    return dict(
        layers=layers,
        q=None if fused else one["q"],
        k=None if fused else one["k"],
        v=None if fused else one["v"],
        qkv=one.get("qkv"),
        o=one["o"],
        ffn_in=tuple(roles["ffn_in"]),
        ffn_out=one["ffn_out"],
        attention=attention,
        causal="CausalLM" in type(model).__name__ or bool(getattr(model.config, "is_decoder", False)),
        gated=len(roles["ffn_in"]) > 1,
        no_structured=_NOT_EXACT,
        no_attention=_NOT_EXACT,
        inferred=True,
    )


def _check_heads(model: nn.Module, linears: dict[str, nn.Module], one: dict[str, str]) -> None:
    """The query projection must hold the config's heads x head size (else the names fooled the inference)."""
    config = model.config
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    hidden = getattr(config, "hidden_size", None)
    if not heads or "q" not in one:
        return
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None)
    head_dim = head_dim or (hidden // heads if hidden else None)
    out_features = linear_weight(linears[one["q"]]).shape[0]
    if head_dim and out_features != heads * head_dim:
        raise UnsupportedModelError(
            f"cannot infer the layout of model_type {config.model_type!r}: {one['q']} has {out_features} outputs, "
            f"not num_attention_heads x head_dim = {heads} x {head_dim}. Give one with sparse_nlp.targets.use_targets."
        )
