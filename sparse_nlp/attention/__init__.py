"""Sparse attention (token-to-token coupling): patterns, registration with transformers, kernels.

Importing this package registers the ``sparse_nlp`` attention implementation with transformers.
"""

from ..errors import AttentionPatternError
from .apply import apply_attention, remove_attention
from .patterns import (
    BigBird,
    DilatedWindow,
    Fixed,
    GlobalTokens,
    Pattern,
    SinkWindow,
    SlidingWindow,
    Strided,
    Union,
    build_pattern,
)
from .registration import ATTN_NAME

__all__ = [
    "ATTN_NAME",
    "AttentionPatternError",
    "BigBird",
    "DilatedWindow",
    "Fixed",
    "GlobalTokens",
    "Pattern",
    "SinkWindow",
    "SlidingWindow",
    "Strided",
    "Union",
    "apply_attention",
    "build_pattern",
    "remove_attention",
]
