"""`NativeKernel`: one compiled C++ library of the package, built on first use, with its instruction-set cap.

The runtime's sparse-linear kernel and the activation-sparse kernel share this: `ops` compiles the source once per
machine and user (`build_library`; later processes load the cached library) and returns its ``torch.ops``
namespace, or None after one warning where it cannot be built (no compiler, ``SPARSE_NLP_NATIVE=0``, a build
error), and the callers then run their dense path. `best_isa` is the code path the library runs: the CPU's best,
capped by an environment variable (read on every call, so a test can change it).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import torch

from .build import NativeBuildError
from .isa import ISAS, env_isa_cap

logger = logging.getLogger(__name__)


class NativeKernel:
    """A C++ library registered as ``torch.ops.<namespace>`` (with a ``cpu_isa() -> int`` op).

    Args:
        namespace: the ``TORCH_LIBRARY`` namespace the source registers.
        build: compiles and loads the library (raises `NativeBuildError` where it cannot).
        what: the kernel in the warning ("the native <what> kernel is unavailable").
        fallback: what runs instead, for the same warning.
        env_isa: the variable that caps the code path (``portable``, ``avx2``, ``avx512``).
    """

    def __init__(
        self, namespace: str, build: Callable[[], None], what: str, fallback: str, env_isa: str
    ) -> None:
        self.namespace, self.build, self.what, self.fallback, self.env_isa = (
            namespace,
            build,
            what,
            fallback,
            env_isa,
        )
        self._lock = threading.Lock()
        self._state: dict[str, object] = {}
        self._isa_memo: dict[str | None, int] = {}

    def ops(self):
        """``torch.ops.<namespace>`` (built on the first call), or None where it cannot be built (`status` says why;
        one warning is logged)."""
        if "op" in self._state:  # the per-call fast path: no lock once built (or failed)
            return self._state["op"]
        with self._lock:
            if "op" not in self._state:
                op, reason = None, None
                start = time.perf_counter()
                try:
                    self.build()
                    op = getattr(torch.ops, self.namespace)
                except NativeBuildError as err:
                    reason = str(err)
                    logger.warning(
                        "sparse_nlp: the native %s kernel is unavailable (%s); %s",
                        self.what,
                        reason,
                        self.fallback,
                    )
                self._state["reason"] = reason
                self._state["seconds"] = time.perf_counter() - start
                self._state["op"] = op  # last: the lock-free path reads it
            return self._state["op"]

    def status(self) -> str:
        """'ready (<isa>)' once built, else why the native kernel is not used."""
        return f"ready ({ISAS[self.best_isa()]})" if self.ops() is not None else str(self._state["reason"])

    def load_seconds(self) -> float | None:
        """Seconds the first `ops` call took (the compile, or loading the cached library); None before it."""
        return self._state.get("seconds")  # type: ignore[return-value]

    def best_isa(self) -> int:
        """The code path the library runs: the CPU's best (0 portable, 1 AVX2+FMA, 2 AVX-512F), capped by the
        environment variable (memoized per value of it)."""
        raw = os.environ.get(self.env_isa)
        isa = self._isa_memo.get(raw)
        if isa is not None:
            return isa
        op = self.ops()
        if op is None:
            return 0
        if "cpu_isa" not in self._state:
            self._state["cpu_isa"] = int(op.cpu_isa())
        isa = int(self._state["cpu_isa"])  # type: ignore[arg-type]
        cap = env_isa_cap(self.env_isa)
        isa = isa if cap is None else min(isa, cap)
        self._isa_memo[raw] = isa
        return isa

    def cached(self, key: str, make: Callable[[], object]) -> object:
        """A value derived from the built library, computed once (e.g. an op overload looked up once)."""
        if key not in self._state:
            self._state[key] = make()
        return self._state[key]

    def reset(self) -> None:
        """Forget the build result (tests)."""
        with self._lock:
            self._state.clear()
            self._isa_memo.clear()


__all__ = ["NativeKernel"]
