"""Sparse attention (token-to-token coupling): patterns, registration with transformers, kernels.

Importing this package is cheap: the names below load their module (torch, transformers) on first use. The
``sparse_nlp`` attention implementation is registered with transformers by `sparse_nlp.attention.hook` as
soon as transformers loads its model code, and by `apply_attention` in any case.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ATTN_NAME": "sparse_nlp.attention.registration",
    "AttentionPatternError": "sparse_nlp.errors",
    "apply_attention": "sparse_nlp.attention.apply",
    "remove_attention": "sparse_nlp.attention.apply",
    **{
        name: "sparse_nlp.attention.patterns"
        for name in (
            "BigBird",
            "DilatedWindow",
            "Fixed",
            "GlobalTokens",
            "Pattern",
            "SinkWindow",
            "SlidingWindow",
            "Strided",
            "Union",
            "build_pattern",
        )
    },
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:  # a submodule (``from sparse_nlp.attention import kernels``) or a missing name
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = sorted(_LAZY)
