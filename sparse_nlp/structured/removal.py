"""Physical removal of attention heads and FFN neurons: smaller Linear / Conv1D layers, nothing masked.

Units are counted per block (layer):

- **head units**: attention heads, or for grouped-query attention (llama, mistral, qwen2) whole key/value
  groups - one key/value head together with the ``num_key_value_groups`` query heads that read it - so the
  query-to-key/value head ratio, which the attention kernels rely on, never changes;
- **FFN units**: intermediate neurons (a row of each FFN input projection - gate and up for gated MLPs -
  and the matching column of the FFN output projection).

Removing head unit ``u`` drops its rows of q, k and v (or its slices of GPT-2's fused ``c_attn``, which
stores the weight transposed) and its columns of the output projection, then updates the head counts the
attention module reads at run time (``num_attention_heads``/``all_head_size`` for BERT, ``n_heads`` for
DistilBERT, ``num_heads``/``split_size`` for GPT-2). A block whose heads are all removed gets
`EmptyAttention` in place of its attention module: it returns zeros (or the output projection's bias), so
the block adds exactly what the dense block adds when those heads output zero.

All functions work on the current shapes, so removal can be repeated (gradual pruning). Removed layers
get new ``nn.Parameter`` objects: build the optimizer after removal.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import StructuredError
from ..pruning.masking import attach_mask, detach_mask, get_mask
from ..targets import ModelTargets, is_transposed, model_targets

logger = logging.getLogger(__name__)

HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads", "n_heads")
"""Attributes of the transformers attention modules that hold the number of query heads."""


# ---- layer layout ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerLayout:
    """Current unit counts of one block.

    Attributes:
        index: Block index.
        head_dim: Width of one head.
        num_heads: Query heads now in the block (0 once all are removed).
        num_kv_heads: Key/value heads now in the block.
        ffn: FFN intermediate neurons now in the block.
    """

    index: int
    head_dim: int
    num_heads: int
    num_kv_heads: int
    ffn: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 for plain multi-head attention)."""
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 1

    @property
    def head_units(self) -> int:
        """Removable head units: key/value groups (equal to heads without GQA)."""
        return self.num_kv_heads


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (layers) of a model, found through the targets table."""
    entry = model_targets(model)
    base = getattr(model, "base_model", model)
    return list(base.get_submodule(entry.layers))


def _sub(block: nn.Module, path: str) -> nn.Module:
    return block.get_submodule(path)


def _out_features(module: nn.Module) -> int:
    return module.nf if isinstance(module, Conv1D) else module.out_features


def _head_dim(model: nn.Module, attention: nn.Module) -> int:
    if isinstance(attention, EmptyAttention):
        return attention.head_dim
    for attr in ("head_dim", "attention_head_size"):
        value = getattr(attention, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    config = model.config
    return config.hidden_size // config.num_attention_heads


def layer_layout(model: nn.Module, index: int) -> LayerLayout:
    """The current unit counts of block `index`."""
    entry = model_targets(model)
    block = blocks(model)[index]
    attention = _sub(block, entry.attention)
    head_dim = _head_dim(model, attention)
    if isinstance(attention, EmptyAttention):
        heads = kv = 0
    elif entry.qkv is not None:
        heads = kv = _out_features(_sub(block, entry.qkv)) // (3 * head_dim)
    else:
        heads = _out_features(_sub(block, entry.q)) // head_dim
        kv = _out_features(_sub(block, entry.k)) // head_dim
    ffn = _out_features(_sub(block, entry.ffn_in[0]))
    return LayerLayout(index=index, head_dim=head_dim, num_heads=heads, num_kv_heads=kv, ffn=ffn)


def model_layout(model: nn.Module) -> list[LayerLayout]:
    """`LayerLayout` of every block, in order."""
    return [layer_layout(model, i) for i in range(len(blocks(model)))]


# ---- the empty attention module --------------------------------------------------------------------------


class EmptyAttention(nn.Module):
    """Stands in for an attention module whose heads were all removed.

    It returns what the original module returns when every head outputs zero: a zero-width context (when the
    output projection lives outside the attention module, as in BERT) or the output projection applied to a
    zero-width input, which is its bias. A decoder's key/value cache still receives zero-head entries so
    the cached sequence length stays right for the following layers.

    Args:
        head_dim: Width of one head of the removed module (kept for the shape record and for the cache).
        layer_idx: Block index, used for the cache.
        o_name: Attribute name of the output projection when it lives inside this module, else None.
        o_proj: That output projection, already shrunk to zero input features.
    """

    def __init__(
        self, head_dim: int, layer_idx: int, o_name: str | None = None, o_proj: nn.Module | None = None
    ):
        super().__init__()
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.o_name = o_name
        if o_name is not None:
            self.add_module(o_name, o_proj)
        self.is_causal = False

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and hasattr(cache, "update"):
            batch, length = hidden_states.shape[0], hidden_states.shape[1]
            empty = hidden_states.new_zeros(batch, 0, length, self.head_dim)  # (B, 0 heads, T, hd)
            cache.update(empty, empty, self.layer_idx)
        context = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)  # (B, T, 0)
        if (
            self.o_name is not None
        ):  # the output projection of nothing is its bias (Conv1D cannot take width 0)
            o = getattr(self, self.o_name)
            out = hidden_states.new_zeros(*hidden_states.shape[:-1], _out_features(o))  # (B, T, hidden)
            return (out + o.bias if o.bias is not None else out), None
        return context, None

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, layer_idx={self.layer_idx}"


# ---- slicing one layer -----------------------------------------------------------------------------------


@torch.no_grad()
def _slice_layer(module: nn.Module, index: torch.Tensor, dim: str) -> None:
    """Keep entries `index` of the output (``dim="out"``) or input (``"in"``) features of a Linear/Conv1D, in place."""
    mask = get_mask(module)
    if mask is not None:
        detach_mask(module)
    transposed = is_transposed(module)
    # axis of `dim` in the stored weight: Linear stores (out, in), Conv1D (in, out)
    axis = (0 if dim == "out" else 1) if not transposed else (1 if dim == "out" else 0)
    weight = module.weight.detach().index_select(axis, index.to(module.weight.device)).clone()
    module.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    if dim == "out" and module.bias is not None:
        module.bias = nn.Parameter(
            module.bias.detach()[index].clone(), requires_grad=module.bias.requires_grad
        )
    if isinstance(module, Conv1D):
        if dim == "out":
            module.nf = len(index)
        else:
            module.nx = len(index)
    elif dim == "out":
        module.out_features = len(index)
    else:
        module.in_features = len(index)
    if mask is not None:
        attach_mask(module, mask.index_select(axis, index.to(mask.device)))


def _unit_rows(units: Sequence[int], width: int) -> torch.Tensor:
    """Row indices of whole units of `width` rows each, in order."""
    if not units:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(u * width, (u + 1) * width) for u in units])


def _check_keep(keep: Sequence[int], total: int, what: str) -> list[int]:
    keep = sorted(int(k) for k in keep)
    if len(set(keep)) != len(keep) or any(k < 0 or k >= total for k in keep):
        raise StructuredError(f"{what}: indices to keep must be distinct and in [0, {total}), got {keep}.")
    return keep


def keep_heads(model: nn.Module, index: int, keep: Sequence[int]) -> LayerLayout:
    """Keep only head units `keep` of block `index` (key/value groups for GQA); remove the rest.

    Args:
        model: A transformers model of a family in `sparse_nlp.targets.TARGETS`.
        index: Block index.
        keep: Head units to keep, in [0, ``layer_layout(model, index).head_units``).

    Returns:
        The block's new layout.
    """
    entry = model_targets(model)
    layout = layer_layout(model, index)
    keep = _check_keep(keep, layout.head_units, f"layer {index} heads")
    if len(keep) == layout.head_units:
        return layout
    block = blocks(model)[index]
    hd, g = layout.head_dim, layout.group_size
    q_heads = [u * g + j for u in keep for j in range(g)]  # query heads of the kept groups
    q_rows = _unit_rows(q_heads, hd)
    kv_rows = _unit_rows(keep, hd)
    if entry.qkv is not None:
        qkv = _sub(block, entry.qkv)
        width = layout.num_heads * hd
        _slice_layer(qkv, torch.cat([q_rows, kv_rows + width, kv_rows + 2 * width]), "out")
    else:
        _slice_layer(_sub(block, entry.q), q_rows, "out")
        _slice_layer(_sub(block, entry.k), kv_rows, "out")
        _slice_layer(_sub(block, entry.v), kv_rows, "out")
    o = _sub(block, entry.o)
    _slice_layer(o, q_rows, "in")
    attention = _sub(block, entry.attention)
    if not keep:
        _replace_attention(block, entry, attention, hd, index)
    else:
        _set_head_counts(attention, len(q_heads), len(keep), hd)
    logger.debug("layer %d: kept %d of %d head units", index, len(keep), layout.head_units)
    return layer_layout(model, index)


def _set_head_counts(attention: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
    for attr in HEAD_COUNT_ATTRS:
        if isinstance(getattr(attention, attr, None), int):
            setattr(attention, attr, heads)
    if isinstance(getattr(attention, "num_key_value_heads", None), int):
        attention.num_key_value_heads = kv_heads
    if isinstance(getattr(attention, "all_head_size", None), int):
        attention.all_head_size = heads * head_dim
    if isinstance(getattr(attention, "split_size", None), int):  # GPT-2 splits c_attn's output in three
        attention.split_size = heads * head_dim


def _replace_attention(
    block: nn.Module, entry: ModelTargets, attention: nn.Module, head_dim: int, index: int
) -> None:
    prefix = entry.attention + "."
    o_name, o_proj = None, None
    if entry.o.startswith(prefix):
        o_name = entry.o[len(prefix) :]
        if "." in o_name:
            raise StructuredError(
                f"output projection {entry.o!r} is nested inside {entry.attention!r}; not supported."
            )
        o_proj = getattr(attention, o_name)
    empty = EmptyAttention(head_dim, index, o_name, o_proj)
    parent_path, _, leaf = entry.attention.rpartition(".")
    parent = block.get_submodule(parent_path) if parent_path else block
    setattr(parent, leaf, empty)


def keep_ffn(model: nn.Module, index: int, keep: Sequence[int]) -> LayerLayout:
    """Keep only FFN neurons `keep` of block `index` (rows of gate/up or the input projection, columns of down).

    Args:
        model: A transformers model of a family in `sparse_nlp.targets.TARGETS`.
        index: Block index.
        keep: Neurons to keep, in [0, ``layer_layout(model, index).ffn``).
    """
    entry = model_targets(model)
    layout = layer_layout(model, index)
    keep = _check_keep(keep, layout.ffn, f"layer {index} ffn")
    if len(keep) == layout.ffn:
        return layout
    block = blocks(model)[index]
    rows = torch.tensor(keep, dtype=torch.long)
    for path in entry.ffn_in:
        _slice_layer(_sub(block, path), rows, "out")
    _slice_layer(_sub(block, entry.ffn_out), rows, "in")
    return layer_layout(model, index)


def remove_units(
    model: nn.Module,
    heads: dict[int, Sequence[int]] | None = None,
    ffn: dict[int, Sequence[int]] | None = None,
) -> list[LayerLayout]:
    """Remove the given units (block index -> unit indices to REMOVE) and sync the model config.

    Returns:
        The new layout of every block.
    """
    for index, drop in (heads or {}).items():
        total = layer_layout(model, index).head_units
        _check_keep(drop, total, f"layer {index} heads to remove")
        keep_heads(model, index, [u for u in range(total) if u not in set(drop)])
    for index, drop in (ffn or {}).items():
        total = layer_layout(model, index).ffn
        _check_keep(drop, total, f"layer {index} ffn to remove")
        keep_ffn(model, index, [u for u in range(total) if u not in set(drop)])
    layouts = model_layout(model)
    sync_config(model, layouts)
    return layouts


@torch.no_grad()
def zero_units(
    model: nn.Module,
    heads: dict[int, Sequence[int]] | None = None,
    ffn: dict[int, Sequence[int]] | None = None,
) -> None:
    """Zero the given units without removing them (the dense reference of `remove_units`).

    A head unit is zeroed through the output-projection columns of its query heads, an FFN neuron through
    its column of the FFN output projection: the block then adds exactly what the removed model adds.
    """
    entry = model_targets(model)
    for index, drop in (heads or {}).items():
        layout = layer_layout(model, index)
        g, hd = layout.group_size, layout.head_dim
        cols = _unit_rows([u * g + j for u in drop for j in range(g)], hd)
        o = _sub(blocks(model)[index], entry.o)
        weight = o.weight.t() if is_transposed(o) else o.weight  # (out, in)
        weight[:, cols] = 0
    for index, drop in (ffn or {}).items():
        out = _sub(blocks(model)[index], entry.ffn_out)
        weight = out.weight.t() if is_transposed(out) else out.weight  # (out, in)
        weight[:, torch.tensor(sorted(drop), dtype=torch.long)] = 0


FFN_SIZE_ATTRS = {"gpt2": "n_inner", "distilbert": "hidden_dim"}
"""Config attribute holding the FFN width, where it is not ``intermediate_size``."""


def sync_config(model: nn.Module, layouts: list[LayerLayout]) -> None:
    """Write a uniform FFN width into the config, so plain transformers can build the shrunk FFN.

    Per-layer widths and removed heads cannot be expressed in a transformers config: they live in our
    metadata (`sparse_nlp.structured.shapes`), and the config keeps the original sizes so that plain
    transformers refuses the checkpoint (size mismatch) rather than loading random weights.
    """
    sizes = {lay.ffn for lay in layouts}
    if len(sizes) == 1:
        attr = FFN_SIZE_ATTRS.get(model.config.model_type, "intermediate_size")
        setattr(model.config, attr, sizes.pop())
