"""The files of a sparse_nlp checkpoint and the manifest that lists them in config.json.

The manifest is ``config.json["sparse_nlp"]["files"]`` (file name -> size in bytes, every file but
config.json) plus ``["tokenizer_files"]`` (which of them the tokenizer wrote), so a truncated, missing or
swapped file is reported by name on load, before any weight is read.

Checkpoints written since the integrity checks also carry (older ones load without them, with the checks
their fields allow):

- ``["sha256"]``: file name -> SHA-256 hex digest of its bytes, for every file of ``files``;
- ``["save_id"]``: a random id of the save, also written into the ``__metadata__`` of every safetensors file
  of the checkpoint (`SAVE_ID_KEY`), so a file from another save is named on load;
- ``["kept_zeros"]``: masked module -> how many weights its mask keeps that are exactly 0.0 (only modules
  with any), so a mask bit flipped from pruned to kept is caught even without the hashes.
"""

from __future__ import annotations

import re
from typing import Any

METADATA_KEY = "sparse_nlp"
"""The config.json key that holds sparse_nlp's metadata."""

MASKS_FILE = "sparse_masks.safetensors"
CONFIG_FILE = "sparsity_config.json"
COMPACT_FILE = "sparse_nlp_compact.safetensors"
INDEX_FILE = "model.safetensors.index.json"
OUR_FILES = (MASKS_FILE, CONFIG_FILE, COMPACT_FILE, INDEX_FILE)
"""Files a save writes besides the model's own; a later save removes those it does not write again."""
CHECKPOINT_PATTERNS = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    INDEX_FILE,
    "pytorch_model*.bin",
    MASKS_FILE,
    CONFIG_FILE,
    COMPACT_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
"""Glob patterns of the files a checkpoint without a manifest consists of (what transformers and sparse_nlp
write); other files in its folder (logs, evaluation JSONs, Trainer folders) are not part of it."""


SAVE_ID_KEY = "sparse_nlp.save_id"
"""The key of the save id in the ``__metadata__`` of every safetensors file of a checkpoint."""

_HEX64 = re.compile(r"[0-9a-f]{64}")


def with_manifest(
    meta: dict[str, Any],
    sizes: dict[str, int],
    tokenizer_files: list[str],
    sha256: dict[str, str] | None = None,
    save_id: str | None = None,
) -> dict[str, Any]:
    """A copy of the metadata dict `meta` recording `sizes` (file name -> bytes, config.json excluded),
    their SHA-256 digests and the save id (both left out when None)."""
    meta = dict(meta)
    meta["files"] = sizes
    meta["tokenizer_files"] = tokenizer_files
    for key, value in (("sha256", sha256), ("save_id", save_id)):
        if value is not None:
            meta[key] = value
        else:
            meta.pop(key, None)
    return meta


def unsafe_name(name: str) -> bool:
    """Whether a manifest file name could point outside its folder (absolute, ``..``, a backslash, empty)."""
    parts = name.split("/")
    return (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or (len(name) > 1 and name[1] == ":")
        or any(part in ("", ".", "..") for part in parts)
    )


def manifest_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with the types of the manifest fields of `meta` (None when they are well formed).

    Checks ``files`` (object of file name -> non-negative integer; names stay inside the folder),
    ``tokenizer_files`` (list of names listed in ``files``), ``sha256`` (object of listed name -> 64 hex
    digits, one per file), ``save_id`` (string) and ``kept_zeros`` (object of name -> non-negative integer).
    Every field is optional (older checkpoints lack the newer ones).
    """
    files = meta.get("files")
    if files is not None:
        if not isinstance(files, dict):
            return f"files must be an object of file name -> size in bytes, got {type(files).__name__}."
        for name, size in files.items():
            if unsafe_name(name):
                return f"files lists {name!r}, which is not a plain file name inside the checkpoint folder."
            if name == "config.json":
                return "files must not list config.json itself."
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                return f"files[{name!r}] must be a size in bytes (an integer >= 0), got {size!r:.40}."
    tokenizer_files = meta.get("tokenizer_files")
    if tokenizer_files is not None:
        if not isinstance(tokenizer_files, list) or not all(isinstance(n, str) for n in tokenizer_files):
            return f"tokenizer_files must be a list of file names, got {tokenizer_files!r:.60}."
        stray = [n for n in tokenizer_files if n not in (files or {})]
        if stray:
            return f"tokenizer_files lists {stray[0]!r}, which files does not list."
    digests = meta.get("sha256")
    if digests is not None:
        if not isinstance(digests, dict):
            return f"sha256 must be an object of file name -> hex digest, got {type(digests).__name__}."
        for name, digest in digests.items():
            if name not in (files or {}):
                return f"sha256 lists {name!r}, which files does not list."
            if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
                return f"sha256[{name!r}] must be 64 lowercase hex digits, got {digest!r:.70}."
        unhashed = sorted(set(files or {}) - set(digests))
        if unhashed:
            return f"sha256 has no digest for {unhashed[0]!r}, which files lists."
    save_id = meta.get("save_id")
    if save_id is not None and (not isinstance(save_id, str) or not save_id):
        return f"save_id must be a non-empty string, got {save_id!r:.40}."
    kept = meta.get("kept_zeros")
    if kept is not None and (
        not isinstance(kept, dict)
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in kept.values())
    ):
        return f"kept_zeros must be an object of module name -> count (an integer >= 0), got {kept!r:.60}."
    return None


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
