"""Sparse execution on the CPU: pruned Linear layers packed into compressed rows (blocks, N:M groups) and run by native kernels.

``sparse_nlp.runtime.convert(model)`` replaces the sparse Linear layers of a model (in place) by `SparseLinear`
layers that pick, per layer and token count, the fastest of a native C++ kernel (AVX-512 / AVX2+FMA / portable,
chosen at run time), torch's sparse CSR matmul and the dense product, by timing them at conversion (cached on
disk). The converted model is for inference (forward, ``generate``); it still saves a normal checkpoint.
"""

from __future__ import annotations

from .convert import MAX_DENSITY, convert, converted_layers, pack, revert
from .formats import BSRWeight, CSRWeight, NMWeight, PackedWeight, pack_weight
from .fusion import FusedActivation, fuse_activations, unfuse_activations
from .layer import BUCKETS, METHODS, SparseLinear, SparseRuntimeError, bucket_of

__all__ = [
    "BUCKETS",
    "MAX_DENSITY",
    "METHODS",
    "BSRWeight",
    "CSRWeight",
    "FusedActivation",
    "NMWeight",
    "PackedWeight",
    "SparseLinear",
    "SparseRuntimeError",
    "bucket_of",
    "convert",
    "converted_layers",
    "fuse_activations",
    "pack",
    "pack_weight",
    "revert",
    "unfuse_activations",
]
