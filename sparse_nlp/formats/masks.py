"""Masks as packed bits: the codec of ``sparse_masks.safetensors`` (no file I/O here).

Each bool mask is stored as uint8 packed bits (row-major, 8 entries per byte, big-endian bit order) under
its base-relative module name; the shapes go to the safetensors header as JSON under ``shapes``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

FORMAT = "sparse_nlp.packed_bits"


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 packed bits (row-major, 8 entries per byte, big-endian bit order)."""
    return torch.from_numpy(np.packbits(mask.detach().cpu().numpy().reshape(-1)))


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_bits`: the bool tensor of `shape`; ValueError when the byte count does not fit."""
    count = math.prod(shape)
    if packed.numel() != (count + 7) // 8:
        raise ValueError(f"{packed.numel()} mask bytes stored, {(count + 7) // 8} expected for shape {shape}")
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=count).astype(bool)).reshape(shape)


def encode_masks(masks: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Bool masks by name -> (packed tensors, safetensors header metadata with their shapes)."""
    tensors = {key: pack_bits(mask) for key, mask in masks.items()}
    shapes = {key: list(mask.shape) for key, mask in masks.items()}
    return tensors, mask_metadata(shapes)


def mask_metadata(shapes: dict[str, list[int]]) -> dict[str, str]:
    """The safetensors header metadata of a mask file with masks of these shapes (in this order)."""
    return {"format": FORMAT, "shapes": json.dumps(shapes)}


def check_masks(
    packed: dict[str, torch.Tensor], shapes: dict[str, list[int]]
) -> dict[str, tuple[torch.Tensor, tuple[int, ...]]]:
    """The packed bits of each mask with its shape, checked but not unpacked (`unpack_bits` each when needed: a
    bool mask is 8 times its packed bytes).

    Raises:
        ValueError: as `decode_masks`.
    """
    missing = sorted(set(packed) ^ set(shapes))
    if missing:
        raise ValueError(f"masks and their recorded shapes disagree for {missing}.")
    out = {}
    for k, v in packed.items():
        shape = tuple(shapes[k])
        if v.numel() != (int(np.prod(shape)) + 7) // 8:
            raise ValueError(
                f"mask {k!r} holds {v.numel()} bytes but its recorded shape {shape} needs {(int(np.prod(shape)) + 7) // 8}."
            )
        out[k] = (v, shape)
    return out


def decode_masks(packed: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Inverse of `encode_masks` given the parsed ``shapes`` header entry.

    Raises:
        ValueError: the names of the tensors and of the shapes disagree, or a mask's byte count does not
            fit its shape (the message names the mask; the caller adds the file name).
    """
    return {k: unpack_bits(v, shape) for k, (v, shape) in check_masks(packed, shapes).items()}
