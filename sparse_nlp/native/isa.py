"""The code paths (instruction sets) of the package's native kernels, and the environment variables that cap them."""

from __future__ import annotations

import os

ISAS = ("portable", "avx2", "avx512")
"""Every kernel's code paths, in its numbering: 0 portable C++, 1 AVX2+FMA, 2 AVX-512F."""


def isa_index(name: str, source: str) -> int:
    """The number of the code path `name` (case and surrounding spaces ignored).

    Raises:
        ValueError: `name` is not one of `ISAS`; the message shows it as ``source=name``.
    """
    key = name.strip().lower()
    if key not in ISAS:
        raise ValueError(f"{source}={name!r} is not one of {', '.join(ISAS)}.")
    return ISAS.index(key)


def env_isa_cap(env_var: str) -> int | None:
    """The code path ``$env_var`` caps a kernel at, or None when it is unset or empty."""
    raw = os.environ.get(env_var, "").strip()
    return isa_index(raw, env_var) if raw else None


__all__ = ["ISAS", "env_isa_cap", "isa_index"]
