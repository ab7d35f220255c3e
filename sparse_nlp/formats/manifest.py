"""The files of a sparse_nlp checkpoint and the manifest that lists them in config.json.

The manifest is ``config.json["sparse_nlp"]["files"]`` (file name -> size in bytes, every file but
config.json) plus ``["tokenizer_files"]`` (which of them the tokenizer wrote), so a truncated, missing or
swapped file is reported by name on load, before any weight is read.
"""

from __future__ import annotations

from typing import Any

METADATA_KEY = "sparse_nlp"
"""The config.json key that holds sparse_nlp's metadata."""

MASKS_FILE = "sparse_masks.safetensors"
CONFIG_FILE = "sparsity_config.json"
COMPACT_FILE = "sparse_nlp_compact.safetensors"
INDEX_FILE = "model.safetensors.index.json"
OUR_FILES = (MASKS_FILE, CONFIG_FILE, COMPACT_FILE, INDEX_FILE)
"""Files a save writes besides the model's own; a later save removes those it does not write again."""


def with_manifest(meta: dict[str, Any], sizes: dict[str, int], tokenizer_files: list[str]) -> dict[str, Any]:
    """A copy of the metadata dict `meta` recording `sizes` (file name -> bytes, config.json excluded)."""
    meta = dict(meta)
    meta["files"] = sizes
    meta["tokenizer_files"] = tokenizer_files
    return meta


def listed_files(meta: dict[str, Any]) -> list[tuple[str, int, str]]:
    """(file name, recorded size, what to call it in a message) for each file the manifest lists."""
    tokenizer_files = set(meta.get("tokenizer_files") or [])
    return [
        (name, size, "tokenizer file" if name in tokenizer_files else "file")
        for name, size in (meta.get("files") or {}).items()
    ]


def safetensors_problem(size: int, header_bytes: int | None, header: dict[str, Any] | None) -> str | None:
    """What is wrong with a safetensors file of `size` bytes, from its 8-byte length and header; None if fine.

    Args:
        size: The file size in bytes.
        header_bytes: The header length from the file's first 8 bytes; None when the file is shorter than 8.
        header: The parsed JSON header; None when the header length already exceeds the file.
    """
    if header_bytes is None:
        return f"truncated ({size} bytes); not even a safetensors header is left."
    if header is None:
        return f"truncated: the header alone needs {header_bytes + 8} bytes but the file has {size}."
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + header_bytes + end:
        what = "truncated" if size < 8 + header_bytes + end else "longer than its header says"
        return f"{what}: expected {8 + header_bytes + end} bytes, found {size}."
    return None
