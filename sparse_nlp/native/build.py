"""Build and load a C++ kernel library once per source, flags, torch, Python and compiler.

Cache layout: ``$SPARSE_NLP_CACHE/kernels/<name>-<digest>/`` (default ``~/.cache/sparse_nlp``), where the digest
covers the source bytes, the flags, the torch and Python versions and the compiler name. The cache root is created
with mode 0700; where the home folder is read-only, a per-user folder in the temp directory is used instead, and it
too must be a 0700 folder owned by the current user. A built library is loaded only when the current user owns it
and its folder, and neither is writable by group or others; anything else is refused with `NativeBuildError`
(a library someone else could have placed is never loaded).

`SPARSE_NLP_NATIVE=0` turns every native kernel off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ENV_SWITCH = "SPARSE_NLP_NATIVE"
ENV_CACHE = "SPARSE_NLP_CACHE"
OPENMP_RUNTIMES = ("libgomp", "libiomp", "libomp")  # GNU, Intel, LLVM
STALE_LOCK_SECONDS = 600  # a build lock older than this is left over from a killed build


class NativeBuildError(RuntimeError):
    """A native kernel could not be built or loaded (no compiler, a compiler error, an unsafe cache folder)."""


def compiler() -> str:
    return os.environ.get("CXX", "c++")


def native_disabled_reason() -> str | None:
    """Why native kernels are turned off by the environment, or None."""
    value = os.environ.get(ENV_SWITCH, "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return f"turned off by {ENV_SWITCH}={os.environ[ENV_SWITCH]}"
    return None


def compiler_missing_reason() -> str | None:
    """Why no kernel can be compiled here (no C++ compiler, no ninja), or None."""
    if shutil.which(compiler()) is None:
        return f"no C++ compiler: {compiler()!r} is not on PATH (install g++ or set CXX)"
    try:
        import ninja  # noqa: F401  (torch's extension builder runs the ninja executable)
    except ImportError:
        return "the ninja package is missing (pip install ninja)"
    return None


@functools.cache
def _compiler_is_gcc() -> bool:
    """Whether $CXX is GCC (whose -fopenmp code calls GNU libgomp; clang's calls LLVM's libomp)."""
    try:
        macros = subprocess.run(
            [compiler(), "-dM", "-E", "-x", "c++", os.devnull], capture_output=True, text=True, timeout=60
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
def openmp_flags() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Compile and link flags that run a kernel's at::parallel_for on torch's own OpenMP threads.

    at::parallel_for is header code: with torch's OpenMP backend it runs on one thread unless the kernel is
    compiled with OpenMP. The link names the exact file torch loaded (some wheels ship libgomp under a hashed
    name), so no second runtime is loaded. Without a GNU libgomp in torch or a GCC compiler: no flags (one thread).
    """
    runtimes = openmp_runtimes() if torch._C.has_openmp else []
    gomp = [p for p in runtimes if p.name.startswith("libgomp")]
    if not gomp or not _compiler_is_gcc():
        return (), ()
    return ("-fopenmp",), (f"-L{gomp[0].parent}", f"-l:{gomp[0].name}")


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) with mode 0700 where missing; refuse it unless this user owns it and only they
    can write it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_owned(path)
    if hasattr(os, "getuid") and stat.S_IMODE(path.stat().st_mode) & 0o077:
        path.chmod(0o700)  # ours, made by an older version or by hand: keep what it holds private
    return path


def check_owned(path: Path) -> None:
    if not hasattr(os, "getuid"):  # no POSIX owners (Windows): the user profile folder is private already
        return
    info = path.stat()
    if info.st_uid != os.getuid():
        raise NativeBuildError(
            f"{path} belongs to user id {info.st_uid}, not to you ({os.getuid()}); refusing to load native code "
            f"from it (set {ENV_CACHE} to a folder of your own)"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise NativeBuildError(
            f"{path} is writable by other users (mode {stat.S_IMODE(info.st_mode):o}); refusing to load native code "
            f"from it (chmod go-w it, or set {ENV_CACHE} to a private folder)"
        )


def cache_root() -> Path:
    """The per-user kernel cache (created 0700): ``$SPARSE_NLP_CACHE/kernels`` or ``~/.cache/sparse_nlp/kernels``,
    else (read-only home) ``<tmp>/sparse_nlp-<uid>/kernels``."""
    root = os.environ.get(ENV_CACHE)
    base = (
        Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparse_nlp"
    )
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        return private_dir(base / "kernels")
    except OSError:  # a read-only home
        user = str(os.getuid()) if hasattr(os, "getuid") else "user"
        fallback = Path(tempfile.gettempdir()) / f"sparse_nlp-{user}"
        return private_dir(private_dir(fallback) / "kernels")


def library_folder(name: str, source: Path, flags: Sequence[str]) -> Path:
    """``<cache root>/<name>-<digest of source, flags, torch, Python, compiler>`` (not created)."""
    key = [source.read_bytes(), " ".join(flags), torch.__version__, sys.version, compiler()]
    digest = hashlib.sha256(b"\0".join(x if isinstance(x, bytes) else x.encode() for x in key))
    return cache_root() / f"{name}-{digest.hexdigest()[:16]}"


def build_library(name: str, source: Path, extra_cflags: Sequence[str] = ("-O3",)) -> Path:
    """Compile `source` (once; later calls load the cached library) and load it into torch.ops; returns the library.

    Raises:
        NativeBuildError: turned off, no compiler, a compiler error, or a cache folder another user could write.
    """
    reason = native_disabled_reason() or compiler_missing_reason()
    if reason:
        raise NativeBuildError(reason)
    import ninja

    # torch finds ninja on PATH; a virtual environment used without activation does not have it there
    if shutil.which("ninja") is None:
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    from torch.utils.cpp_extension import load

    cflags, ldflags = openmp_flags()
    flags = list(extra_cflags) + list(cflags)
    folder = private_dir(library_folder(name, source, flags + list(ldflags)))
    lib_name = f"sparse_nlp_{name}_{folder.name.rsplit('-', 1)[1]}"
    built = folder / f"{lib_name}.so"
    if built.exists():  # built before: load it directly (no build lock to wait on), if it is ours
        check_owned(built)
        torch.ops.load_library(str(built))
        return built
    lock = folder / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
        # a build killed half-way leaves its lock behind, and torch's builder would wait on it for ever
        logger.warning("sparse_nlp: removing a stale build lock %s", lock)
        lock.unlink(missing_ok=True)
    logger.info("sparse_nlp: compiling the native %s kernel into %s (once)", name, folder)
    if torch._C.has_openmp and not cflags:
        logger.info("sparse_nlp: building it without OpenMP (no GNU libgomp in torch or no GCC): one thread")
    try:
        load(
            name=lib_name,
            sources=[str(source)],
            extra_cflags=flags,
            extra_ldflags=list(ldflags),
            build_directory=str(folder),
            is_python_module=False,
            verbose=False,
        )
    except Exception as err:  # a compiler or linker error
        raise NativeBuildError(f"build failed: {first_error(str(err)) or type(err).__name__}") from err
    check_owned(built)
    return built


def first_error(message: str) -> str:
    """The compiler's first error line in a build failure's message, else its last line."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower() and not line.lower().startswith("error building extension"):
            return line
    return lines[-1] if lines else ""
