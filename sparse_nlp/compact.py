"""The compact checkpoint format, under its earlier import path.

The encoding lives in `sparse_nlp.formats.compact` (pure: tensors in, tensors out) and the folder work in
`sparse_nlp.checkpoint` (`compact_folder`, `read_compact`, `compact_stats`, `expanded`); this module
re-exports both so ``from sparse_nlp.compact import ...`` keeps working.
"""

from __future__ import annotations

from .checkpoint import compact_folder, compact_stats, dense_weight_files, expanded, read_compact
from .errors import CompactFormatError
from .formats.compact import (
    ATTN_MARKER,
    COMPACT_VERSION,
    HEADER_KEY,
    MISSING_SHARD,
    decode_bitmask,
    decode_nm,
    encode_bitmask,
    encode_nm,
    encode_tensor,
    is_compact,
    nm_axis,
    nonzero_entries,
)
from .formats.manifest import COMPACT_FILE, INDEX_FILE
from .formats.masks import pack_bits, unpack_bits

__all__ = [
    "ATTN_MARKER",
    "COMPACT_FILE",
    "COMPACT_VERSION",
    "HEADER_KEY",
    "INDEX_FILE",
    "MISSING_SHARD",
    "CompactFormatError",
    "compact_folder",
    "compact_stats",
    "decode_bitmask",
    "decode_nm",
    "dense_weight_files",
    "encode_bitmask",
    "encode_nm",
    "encode_tensor",
    "expanded",
    "is_compact",
    "nm_axis",
    "nonzero_entries",
    "pack_bits",
    "read_compact",
    "unpack_bits",
]
