"""The compact weight encoding (pure: tensors and dicts in and out; `sparse_nlp.checkpoint` does the files).

A compact checkpoint is a sparse_nlp checkpoint folder (see `sparse_nlp.checkpoint`) whose dense weight
files (``model.safetensors`` or its shards) are replaced by one file, ``sparse_nlp_compact.safetensors``:

- a masked weight whose mask follows N:M along one axis (exactly N kept in every group of M) is stored as
  ``KEY.__values`` (the kept values, ``(rows, groups * N)``) and ``KEY.__idx`` (the position of each kept
  value inside its group, ceil(log2 M) bits each, packed into uint8);
- any other masked weight is stored as ``KEY.__mask`` (the keep-mask, one bit per entry, packed into uint8)
  and ``KEY.__values`` (the kept values in row-major order, 1-D);
- every other tensor (embeddings, biases, norms, unmasked weights) is stored unchanged under its key.

(Pruned entries come back as +0.0; a pruned -0.0 loses its sign, which changes no result.)

Each masked weight takes whichever of these is smallest (dense when neither helps), so a compact file is
never larger than the dense one by more than its header. The encoding of every tensor, its shape and dtype
are recorded as JSON in the safetensors header (key ``sparse_nlp_compact``). Kept values are copied, never
recomputed, so decoding is bit-exact, and the masks come back exactly (kept zeros included): the masks of
encoded weights are not stored twice in ``sparse_masks.safetensors``.

Plain transformers cannot read this file, and it must not silently build a model with random weights
instead (it only warns about missing tensors). Two guards make it fail loudly:

- config.json carries ``"attn_implementation": "sparse_nlp_compact__load_with_sparse_nlp.from_pretrained"``:
  every transformers model class refuses that value when it builds the model, before it reads any weight,
  with an error that quotes it;
- ``model.safetensors.index.json`` maps every tensor to a shard named ``REQUIRES_sparse_nlp__...``, which
  does not exist: a loader that overrides ``attn_implementation`` (or ignores it) fails on that file name.

The real ``attn_implementation`` (if any) is kept in ``config.sparse_nlp.compact`` and restored by
`sparse_nlp.from_pretrained`, which expands the file into a temporary dense checkpoint and loads that
through the normal path (so masks, attention settings and structured shapes come back the same way).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..errors import CompactFormatError
from ..pruning.patterns import NM, parse_pattern
from .manifest import COMPACT_FILE, INDEX_FILE, METADATA_KEY
from .masks import pack_bits, unpack_bits

COMPACT_VERSION = 1
HEADER_KEY = "sparse_nlp_compact"
# The value plain transformers refuses (it names this package); see the module docstring.
ATTN_MARKER = "sparse_nlp_compact__load_with_sparse_nlp.from_pretrained"
# The weight file the stub index points to; it never exists, so loaders that get past config.json fail on it.
MISSING_SHARD = "REQUIRES_sparse_nlp__compact_checkpoint__load_with_sparse_nlp.from_pretrained.safetensors"
# ---- pure encoders / decoders --------------------------------------------------------------------------


# Encoders work on the raw bits of a tensor (an integer view, in numpy): exact for every dtype, bf16
# included, and much faster than torch's boolean indexing on a busy CPU.
_INT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_ABS_BITS = {1: 0x7F, 2: 0x7FFF, 4: 0x7FFF_FFFF, 8: 0x7FFF_FFFF_FFFF_FFFF}


def _raw(t: torch.Tensor) -> np.ndarray:
    """The bits of `t` as a numpy integer array of the same shape."""
    return t.detach().cpu().contiguous().view(_INT_VIEWS[t.element_size()]).numpy()


def _from_raw(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).view(dtype)


def nonzero_entries(t: torch.Tensor) -> np.ndarray:
    """Bool numpy array: where `t` is not zero (+0.0 and -0.0 both count as zero)."""
    raw = _raw(t)
    if t.is_floating_point():
        return (raw & raw.dtype.type(_ABS_BITS[t.element_size()])) != 0
    return raw != 0


def _bits_per_index(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


def _pack_uint(values: np.ndarray, bits: int) -> torch.Tensor:
    """Small unsigned ints (< 2**bits) -> packed uint8 bit stream (`bits` bits each, big-endian)."""
    arr = values.reshape(-1).astype(np.uint8)[:, None]  # (K, 1)
    stream = np.unpackbits(arr, axis=1)[:, 8 - bits :]  # (K, bits)
    return torch.from_numpy(np.packbits(stream.reshape(-1)))


def _unpack_uint(packed: torch.Tensor, count: int, bits: int) -> np.ndarray:
    if packed.numel() != (count * bits + 7) // 8:
        raise ValueError(f"{packed.numel()} index bytes stored, {(count * bits + 7) // 8} expected")
    stream = np.unpackbits(packed.numpy(), count=count * bits).reshape(count, bits)  # (K, bits)
    weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.int64)
    return stream.astype(np.int64) @ weights


def _rows_groups(a: np.ndarray, m: int, axis: int) -> np.ndarray:
    """(R, C) array with groups along `axis` -> (R', G, m) with the groups on the last axis."""
    at = a if axis == -1 else a.T
    return np.ascontiguousarray(at).reshape(at.shape[0], -1, m)


def nm_axis(mask: torch.Tensor, n: int, m: int) -> int | None:
    """The axis (-1 or 0) along which a 2-D `mask` keeps exactly `n` of every `m` entries, or None."""
    if mask.dim() != 2:
        return None
    mk = mask.cpu().numpy()
    for axis in (-1, 0):
        if mk.shape[1 if axis == -1 else 0] % m == 0 and bool((_rows_groups(mk, m, axis).sum(-1) == n).all()):
            return axis
    return None


def encode_nm(weight: torch.Tensor, mask: torch.Tensor, n: int, m: int, axis: int) -> dict[str, torch.Tensor]:
    """N:M weight -> ``values`` (R, G*n) and ``idx`` (packed positions of the kept entries in each group of m).

    `mask` must keep exactly `n` of every `m` entries along `axis` (see `nm_axis`).
    """
    groups = _rows_groups(mask.cpu().numpy(), m, axis)  # (R, G, m)
    rows, g = groups.shape[:2]
    if not bool((groups.sum(-1) == n).all()):
        raise ValueError(f"the mask does not keep exactly {n} of every {m} entries along axis {axis}")
    pos = np.nonzero(groups)[2].reshape(rows, g, n)  # row-major: increasing positions inside each group
    values = _rows_groups(_raw(weight), m, axis)[groups].reshape(rows, g * n)  # (R, G*n)
    return {"values": _from_raw(values, weight.dtype), "idx": _pack_uint(pos, _bits_per_index(m))}


def decode_nm(
    values: torch.Tensor, idx: torch.Tensor, shape: tuple[int, ...], n: int, m: int, axis: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `encode_nm`: (weight, mask) of `shape`."""
    rows, cols = shape if axis == -1 else (shape[1], shape[0])
    g = cols // m
    if cols % m or values.numel() != rows * g * n:
        raise ValueError(
            f"{values.numel()} values stored, {rows * g * n} expected for {n}:{m} in shape {shape}"
        )
    pos = _unpack_uint(idx, rows * g * n, _bits_per_index(m)).reshape(rows, g, n)  # (R, G, n)
    if bool((pos >= m).any()):
        raise ValueError(f"an N:M index is >= M={m}")
    mask = np.zeros((rows, g, m), dtype=bool)
    np.put_along_axis(mask, pos, True, axis=-1)
    if int(mask.sum()) != rows * g * n:
        raise ValueError("N:M indices repeat a position inside a group")
    raw = _raw(values)
    weight = np.zeros((rows, g, m), dtype=raw.dtype)
    np.put_along_axis(weight, pos, raw.reshape(rows, g, n), axis=-1)
    weight, mask = weight.reshape(rows, cols), mask.reshape(rows, cols)
    if axis == 0:
        weight, mask = weight.T, mask.T
    return _from_raw(weight, values.dtype), torch.from_numpy(np.ascontiguousarray(mask))


def encode_bitmask(weight: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Masked weight -> ``mask`` (packed bits) and ``values`` (kept entries, row-major, 1-D)."""
    return {"mask": pack_bits(mask), "values": _from_raw(_raw(weight)[mask.cpu().numpy()], weight.dtype)}


def decode_bitmask(
    packed: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    mask = unpack_bits(packed, shape)
    mk = mask.numpy()
    kept = int(mk.sum())
    if kept != values.numel():
        raise ValueError(f"the bitmask keeps {kept} entries but {values.numel()} values are stored")
    raw = _raw(values)
    weight = np.zeros(shape, dtype=raw.dtype)
    weight[mk] = raw
    return _from_raw(weight, values.dtype), mask


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def encode_tensor(
    weight: torch.Tensor, mask: torch.Tensor | None, nm_patterns: list[tuple[int, int]] = ()
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Pick the smallest exact encoding of one tensor: (header entry, tensors to store by suffix)."""
    dense = ({"encoding": "dense"}, {"": weight.contiguous()})
    if mask is None or weight.dim() == 0 or bool(nonzero_entries(weight)[~mask.cpu().numpy()].any()):
        return dense
    candidates = [dense]
    for n, m in nm_patterns:  # before the bitmask: on a tie (2:4) the N:M layout is the more useful one
        axis = nm_axis(mask, n, m)
        if axis is not None:
            candidates.append(
                ({"encoding": "nm", "n": n, "m": m, "axis": axis}, encode_nm(weight, mask, n, m, axis))
            )
    candidates.append(({"encoding": "bitmask"}, encode_bitmask(weight, mask)))
    return min(candidates, key=lambda c: _nbytes(c[1]))  # first of equals wins


# ---- whole checkpoints -----------------------------------------------------------------------------------


def is_compact(config: dict[str, Any]) -> bool:
    """Whether a raw config.json dict belongs to a compact checkpoint."""
    meta = config.get(METADATA_KEY)
    return isinstance(meta, dict) and "compact" in meta


def state_key(rel: str, keys: set[str]) -> str | None:
    """The state-dict key of the weight of base-relative module `rel` (``rel.weight`` or ``prefix.rel.weight``)."""
    exact = f"{rel}.weight"
    if exact in keys:
        return exact
    found = [k for k in keys if k.endswith("." + exact)]
    return found[0] if len(found) == 1 else None


def nm_patterns(meta: dict[str, Any]) -> list[tuple[int, int]]:
    """The distinct N:M patterns (n, m) of the weight rules in the raw metadata dict `meta`."""
    out = []
    for rule in (meta.get("config") or {}).get("weights", []) or []:
        try:
            pattern = parse_pattern(rule.get("pattern", "unstructured"))
        except ValueError:
            continue
        if isinstance(pattern, NM) and (pattern.n, pattern.m) not in out:
            out.append((pattern.n, pattern.m))
    return out


def encode_state(
    state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], patterns: list[tuple[int, int]]
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, torch.Tensor], dict[str, int]]:
    """Encode a dense state dict with its masks (by base-relative module name).

    Returns:
        (tensors to store, their safetensors header metadata, masks of weights stored dense (they still
        need the mask file), summary: bytes as dense vs as stored, all tensors and the masked ones).
    """
    by_key = {}
    for rel, mask in masks.items():
        key = state_key(rel, set(state))
        if key is not None and tuple(state[key].shape) == tuple(mask.shape):
            by_key[key] = (rel, mask)
    header: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    summary = {"dense_bytes": 0, "stored_bytes": 0, "masked_dense_bytes": 0, "masked_stored_bytes": 0}
    leftover = dict(masks)
    for key, weight in state.items():
        rel, mask = by_key.get(key, (None, None))
        entry, parts = encode_tensor(weight, mask, patterns)
        entry.update(shape=list(weight.shape), dtype=str(weight.dtype).removeprefix("torch."))
        if entry["encoding"] != "dense":
            entry["module"] = rel
            leftover.pop(rel)
        header[key] = entry
        for suffix, t in parts.items():
            tensors[f"{key}.__{suffix}" if suffix else key] = t
        dense_b, stored_b = weight.numel() * weight.element_size(), _nbytes(parts)
        summary["dense_bytes"] += dense_b
        summary["stored_bytes"] += stored_b
        if mask is not None:
            summary["masked_dense_bytes"] += dense_b
            summary["masked_stored_bytes"] += stored_b
    metadata = {"format": "pt", HEADER_KEY: json.dumps({"version": COMPACT_VERSION, "tensors": header})}
    return tensors, metadata, leftover, summary


def stub_index(keys: list[str]) -> dict[str, Any]:
    """The ``model.safetensors.index.json`` of a compact folder: every tensor mapped to a shard that never exists."""
    stub = {
        "format": "sparse_nlp_compact",
        "note": f"the weights are in {COMPACT_FILE}; load with sparse_nlp",
    }
    return {"metadata": stub, "weight_map": dict.fromkeys(sorted(keys), MISSING_SHARD)}


def compact_config(config: dict[str, Any]) -> dict[str, Any]:
    """A raw config.json dict of a dense checkpoint -> that of its compact form (the guards set)."""
    config = dict(config)
    meta = dict(config[METADATA_KEY])
    meta["compact"] = {
        "version": COMPACT_VERSION,
        "file": COMPACT_FILE,
        "attn_implementation": config.get("attn_implementation"),
    }
    config[METADATA_KEY] = meta
    config["attn_implementation"] = ATTN_MARKER
    return config


def dense_config(config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Inverse of `compact_config`: (the dense config.json dict, the compact weight file's name)."""
    config = dict(config)
    meta = dict(config[METADATA_KEY])
    info = meta.pop("compact")
    file = (info.get("file") or COMPACT_FILE) if isinstance(info, dict) else COMPACT_FILE
    original_attn = info.get("attn_implementation") if isinstance(info, dict) else None
    if original_attn is None:
        config.pop("attn_implementation", None)
    else:
        config["attn_implementation"] = original_attn
    config[METADATA_KEY] = meta
    return config, file


def is_dense_only(name: str) -> bool:
    """Whether a file of a compact folder is replaced when it is expanded (weights, masks, index, config)."""
    return name in (INDEX_FILE, "config.json") or name.endswith(".safetensors")


def parse_header(raw: str | None, where: str) -> dict[str, Any]:
    """The tensor entries of a compact file's header value `raw`; `where` names the file in errors.

    Raises:
        CompactFormatError: no header, a damaged one, or a format version newer than this sparse_nlp.
    """
    if raw is None:
        raise CompactFormatError(
            f"{where}: no {HEADER_KEY!r} entry in the safetensors header; not a compact file."
        )
    try:
        header = json.loads(raw)
        version, entries = header["version"], header["tensors"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CompactFormatError(f"{where}: the {HEADER_KEY!r} header entry is damaged ({err}).") from None
    if not isinstance(version, int) or version > COMPACT_VERSION:
        raise CompactFormatError(
            f"{where}: compact format version {version!r} is newer than this sparse_nlp reads (<= {COMPACT_VERSION}). "
            "Upgrade sparse_nlp: pip install -U sparse-nlp."
        )
    return entries


def decode_entry(
    key: str, entry: dict[str, Any], stored: Mapping[str, torch.Tensor], where: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode one tensor of a compact file from its header `entry`: (weight, mask or None when stored dense).

    `stored` maps the file's tensor names to tensors (a dict, or a reader that loads each on access and raises
    KeyError for a name the file lacks); `where` names the file in errors.

    Raises:
        CompactFormatError: tensors missing or disagreeing with the header, or an unknown encoding.
    """
    try:
        shape = tuple(int(s) for s in entry["shape"])
        encoding = entry["encoding"]
        if encoding == "dense":
            weight, mask = stored[key], None
        elif encoding == "bitmask":
            weight, mask = decode_bitmask(stored[f"{key}.__mask"], stored[f"{key}.__values"], shape)
        elif encoding == "nm":
            n, m, axis = int(entry["n"]), int(entry["m"]), int(entry["axis"])
            weight, mask = decode_nm(stored[f"{key}.__values"], stored[f"{key}.__idx"], shape, n, m, axis)
        else:
            raise CompactFormatError(f"{where}: tensor {key!r} has unknown encoding {encoding!r}.")
    except KeyError as err:
        raise CompactFormatError(
            f"{where}: tensor {key!r}: missing {err} in the file or its header."
        ) from None
    except (ValueError, RuntimeError) as err:
        if isinstance(err, CompactFormatError):
            raise
        raise CompactFormatError(f"{where}: tensor {key!r} disagrees with its header ({err}).") from None
    if tuple(weight.shape) != shape:
        raise CompactFormatError(
            f"{where}: tensor {key!r} has shape {tuple(weight.shape)} but the header records {shape}."
        )
    return weight, mask


def mask_owner(key: str, entry: dict[str, Any]) -> str:
    """The base-relative module name a decoded mask of tensor `key` belongs to."""
    return entry.get("module") or key.removesuffix(".weight")


def decode_state(
    stored: dict[str, torch.Tensor], raw_header: str | None, where: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Decode the tensors of a compact file: (dense state dict, masks by base-relative module name).

    Raises:
        CompactFormatError: a damaged header, a newer format version, or tensors that disagree with the header.
    """
    entries = parse_header(raw_header, where)
    state, masks = {}, {}
    for key, entry in entries.items():
        weight, mask = decode_entry(key, entry, stored, where)
        state[key] = weight
        if mask is not None:
            masks[mask_owner(key, entry)] = mask
    return state, masks


DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "U8": 1,
    "I8": 1,
    "BOOL": 1,
}
"""Bytes per element of the safetensors dtype names."""


def stats(entries: dict[str, Any], stored: dict[str, int]) -> dict[str, Any]:
    """Sizes in a compact file from its header entries and the stored bytes of each of its tensors.

    Returns ``dense_bytes`` / ``stored_bytes`` (all tensors as dense vs as stored), ``sparse_dense_bytes`` /
    ``sparse_stored_bytes`` (the same for the tensors stored sparsely: the pruned Linear weights) and
    ``encodings`` (count per encoding).
    """
    out: dict[str, Any] = {
        "dense_bytes": 0,
        "stored_bytes": 0,
        "sparse_dense_bytes": 0,
        "sparse_stored_bytes": 0,
        "encodings": {},
    }
    for key, entry in entries.items():
        element = torch.empty(0, dtype=getattr(torch, entry["dtype"])).element_size()
        dense = element * math.prod(entry["shape"])
        kept = sum(v for k, v in stored.items() if k == key or k.startswith(key + ".__"))
        out["dense_bytes"] += dense
        out["stored_bytes"] += kept
        out["encodings"][entry["encoding"]] = out["encodings"].get(entry["encoding"], 0) + 1
        if entry["encoding"] != "dense":
            out["sparse_dense_bytes"] += dense
            out["sparse_stored_bytes"] += kept
    return out
