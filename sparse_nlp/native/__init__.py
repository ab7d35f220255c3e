"""Compiling the package's C++ kernels on first use: one build helper for every native kernel.

`build_library` compiles one C++ source with ``torch.utils.cpp_extension`` (ninja and the system C++ compiler) into
a per-user cache folder and loads it with ``torch.ops.load_library``. Kernels pick their instruction set at run time
(``__attribute__((target(...)))`` functions chosen by ``__builtin_cpu_supports``), so one build serves AVX2 and
AVX-512 machines alike. See `sparse_nlp.native.build` for the cache layout and its safety checks.
"""

from __future__ import annotations

from .build import (
    ENV_CACHE,
    ENV_SWITCH,
    NativeBuildError,
    build_library,
    cache_root,
    check_owned,
    compiler_missing_reason,
    native_disabled_reason,
    openmp_flags,
    openmp_runtimes,
    private_dir,
)
from .isa import ISAS, env_isa_cap, isa_index
from .kernel import NativeKernel

__all__ = [
    "ENV_CACHE",
    "ENV_SWITCH",
    "ISAS",
    "NativeBuildError",
    "NativeKernel",
    "build_library",
    "cache_root",
    "check_owned",
    "compiler_missing_reason",
    "env_isa_cap",
    "isa_index",
    "native_disabled_reason",
    "openmp_flags",
    "openmp_runtimes",
    "private_dir",
]
