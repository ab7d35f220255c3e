"""The native band-attention forward: a C++ kernel for x86-64 CPUs with AVX-512, compiled on first use.

The blocked kernel's forward runs its band, its global key columns and its global query rows through this kernel
when it can: fp32 on the CPU, head size 16, 32, 64 or 128, an AVX-512 CPU, and a C++ compiler on the machine. It
computes the same output and log-sum-exp as torch's flash-attention op on the key windows, in one pass and without
the window copies and log-sum-exp merges around the op: 1.2x-1.65x faster than that path at 12 heads x 64, about
even at MiniLM's 12 x 32 (`benchmarks/attention_speed.py`). The backward pass is unchanged (the flash op's).

The first use compiles `band_attention.cpp` with `torch.utils.cpp_extension` (ninja and the system C++ compiler;
about 20 s) into a cache folder keyed by the source, the compiler flags, the torch and Python versions and the
compiler name: ``$SPARSE_NLP_CACHE/kernels`` (default ``~/.cache/sparse_nlp/kernels``), created with mode 0700; a
built library is loaded only if the current user owns it and its folder and neither is writable by others
(`sparse_nlp.native.build`). Later processes load it at once. `SPARSE_NLP_NATIVE=0` turns it off. Where it cannot
run (another CPU, no compiler, a failed build, a cache folder others can write) the blocked kernel keeps its flash-op
path, which gives the same values; a failed build is logged as a warning once, with why.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from ....native import check_owned, private_dir

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("band_attention.cpp")
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma")
OPENMP_RUNTIMES = ("libgomp", "libiomp", "libomp")  # GNU, Intel, LLVM
HEAD_SIZES = (16, 32, 64, 128)
ENV_SWITCH = "SPARSE_NLP_NATIVE"
ENV_CACHE = "SPARSE_NLP_CACHE"
STALE_LOCK_SECONDS = 600  # a build lock older than this is left over from a killed build

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}
_OFF = threading.local()  # `turned_off` blocks active in this thread


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _compiler_is_gcc() -> bool:
    """Whether $CXX is GCC (whose -fopenmp code calls GNU libgomp; clang's calls LLVM's libomp)."""
    try:
        macros = subprocess.run(
            [_compiler(), "-dM", "-E", "-x", "c++", os.devnull], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "__GNUC__" in macros and "__clang__" not in macros


def openmp_runtimes() -> list[Path]:
    """The OpenMP runtime libraries mapped into this process (Linux; empty where /proc is absent)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return []
    paths = {line.split()[-1] for line in maps.read_text().splitlines() if line.count(" ") >= 5}
    return sorted(Path(p) for p in paths if Path(p).name.startswith(OPENMP_RUNTIMES))


@functools.cache
def _openmp() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Compile and link flags that run the kernel's at::parallel_for on torch's own OpenMP threads.

    at::parallel_for is header code: with torch's OpenMP backend it runs on one thread unless the kernel is
    compiled with OpenMP. The link names the exact file torch loaded (some wheels ship libgomp under a hashed
    name), so no second runtime is loaded. Without a GNU libgomp in torch or a GCC compiler: no flags (one thread).
    """
    runtimes = openmp_runtimes() if torch._C.has_openmp else []
    gomp = [p for p in runtimes if p.name.startswith("libgomp")]
    if not gomp or not _compiler_is_gcc():
        return (), ()
    return ("-fopenmp",), (f"-L{gomp[0].parent}", f"-l:{gomp[0].name}")


def cache_dir() -> Path:
    """Folder of the compiled kernel for this source, these flags, this torch, this Python and this compiler name."""
    root = os.environ.get(ENV_CACHE)
    base = (
        Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparse_nlp"
    )
    cflags, ldflags = _openmp()
    flags = " ".join(FLAGS + cflags + ldflags)
    key = [SOURCE.read_bytes(), flags, torch.__version__, sys.version, _compiler()]
    digest = hashlib.sha256(b"\0".join(x if isinstance(x, bytes) else x.encode() for x in key))
    return base / "kernels" / f"band_attention-{digest.hexdigest()[:16]}"


def unavailable_reason() -> str | None:
    """Why the native kernel cannot run on this machine, or None when it can be built."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"turned off by {ENV_SWITCH}={os.environ[ENV_SWITCH]}"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"needs an x86-64 CPU with AVX-512 (this is {platform.machine()})"
    capability = torch.backends.cpu.get_cpu_capability()
    if "AVX512" not in capability and capability != "AMX":
        return f"needs a CPU with AVX-512 (torch reports {capability})"
    compiler = _compiler()
    if shutil.which(compiler) is None:
        return f"no C++ compiler: {compiler!r} is not on PATH (install g++ or set CXX)"
    try:
        import ninja  # noqa: F401  (torch's extension builder runs the ninja executable)
    except ImportError:
        return "the ninja package is missing (pip install ninja)"
    return None


def _build():
    import ninja

    # torch finds ninja on PATH; a virtual environment used without activation does not have it there
    if shutil.which("ninja") is None:
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    from torch.utils.cpp_extension import load

    folder = cache_dir()
    try:  # a folder only this user can write (mode 0700), or NativeBuildError: nothing foreign is ever loaded
        private_dir(folder)
    except OSError:  # a read-only home: build in a per-user temp folder instead (rebuilt after a reboot)
        user = str(os.getuid()) if hasattr(os, "getuid") else "user"
        base = private_dir(Path(tempfile.gettempdir()) / f"sparse_nlp-{user}")
        folder = private_dir(base / folder.relative_to(folder.parents[1]))
    name = f"sparse_nlp_band_{folder.name.rsplit('-', 1)[1]}"
    built = folder / f"{name}.so"
    _STATE["library"] = built
    if built.exists():  # built before: load it directly (no build lock to wait on), if this user owns it
        check_owned(built)
        torch.ops.load_library(str(built))
        return torch.ops.sparse_nlp
    lock = folder / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
        # a build killed half-way leaves its lock behind, and torch's builder would wait on it for ever
        logger.warning("sparse_nlp: removing a stale build lock %s", lock)
        lock.unlink(missing_ok=True)
    logger.info("sparse_nlp: compiling the native band-attention kernel into %s (once, about 20 s)", folder)
    cflags, ldflags = _openmp()
    if torch._C.has_openmp and not cflags:
        logger.info("sparse_nlp: building it without OpenMP (no GNU libgomp in torch or no GCC): one thread")
    load(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=list(FLAGS + cflags),
        extra_ldflags=list(ldflags),
        build_directory=str(folder),
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.sparse_nlp


def _first_error(message: str) -> str:
    """The compiler's first error line in a build failure's message, else its last line."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower() and not line.lower().startswith("error building extension"):
            return line
    return lines[-1] if lines else ""


def ops():
    """The compiled ops (`band_forward`, `global_rows`), built on first call; None where they cannot run (`status`
    says why)."""
    with _LOCK:
        if "op" not in _STATE:
            reason, op = unavailable_reason(), None
            if reason is None:
                try:
                    op = _build()
                except Exception as err:  # a compiler or linker error: keep the flash-op path, say why once
                    reason = f"build failed: {_first_error(str(err)) or type(err).__name__}"
                    logger.warning(
                        "sparse_nlp: native band-attention kernel unavailable (%s; build folder %s); using the "
                        "slower flash-op path",
                        reason,
                        cache_dir(),
                    )
            _STATE["op"], _STATE["reason"] = op, reason
        return _STATE["op"]


def status() -> str:
    """'ready' once built, else why the native kernel is not used (builds it first if not yet tried)."""
    return "ready" if ops() is not None else str(_STATE["reason"])


@contextlib.contextmanager
def turned_off():
    """Within this block (in this thread) the blocked kernel takes its flash-op path: for side-by-side timing."""
    _OFF.depth = getattr(_OFF, "depth", 0) + 1
    try:
        yield
    finally:
        _OFF.depth -= 1


def usable(query: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the native kernel can run attention on `query` (and `others`: the keys and values, which must have
    its head count and head size); builds the kernel on first call."""
    return (
        not getattr(_OFF, "depth", 0)
        and query.device.type == "cpu"
        and query.dtype == torch.float32
        and query.shape[-1] in HEAD_SIZES
        and all(
            x.dtype == query.dtype and x.shape[-1] == query.shape[-1] and x.shape[1] == query.shape[1]
            for x in others
        )
        and ops() is not None
    )


__all__ = [
    "ENV_CACHE",
    "ENV_SWITCH",
    "HEAD_SIZES",
    "cache_dir",
    "ops",
    "status",
    "turned_off",
    "unavailable_reason",
    "usable",
]
