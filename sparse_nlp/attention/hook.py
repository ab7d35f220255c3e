"""Register the ``sparse_nlp`` attention implementation when transformers loads its model code.

transformers checks a model's ``attn_implementation`` against its registries when it builds the model, and
every model class comes from ``transformers.modeling_utils``. Registering means importing that module (and
torch): seconds, which ``import sparse_nlp`` should not cost. So `install` registers at once when
transformers' model code is loaded already, and otherwise adds an import hook that registers right after
``transformers.modeling_utils`` has been executed, before any model can be built. A checkpoint whose
config.json names ``attn_implementation: "sparse_nlp"`` therefore loads with plain transformers after
``import sparse_nlp``, exactly as when registration happened at import time.

This module imports nothing heavy itself.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
import threading
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

TRIGGER = "transformers.modeling_utils"
"""The module after whose execution the attention implementation is registered."""

_lock = threading.Lock()


def register_now() -> None:
    """Register with transformers' attention and mask registries (imports torch and transformers' model code).

    `sparse_nlp.attention.registration` registers itself at the end of its import, so this also works when
    that import is what loaded transformers' model code (then the module is still half-initialised here).
    """
    from . import registration  # noqa: F401, PLC0415  (deliberately lazy: torch and transformers' model code)


class _RegisterAfter(importlib.abc.Loader):
    """Runs the real loader of `TRIGGER`, then registers."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        uninstall()
        register_now()

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... of the real loader
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds `TRIGGER` with the normal path finder and wraps its loader in `_RegisterAfter`."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        if fullname != TRIGGER:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisterAfter(spec.loader)
        return spec


_finder = _Finder()


def install() -> None:
    """Register now if transformers' model code is loaded, else when it gets loaded (idempotent)."""
    with _lock:
        if TRIGGER in sys.modules:
            loaded = True
        else:
            loaded = False
            if _finder not in sys.meta_path:
                sys.meta_path.insert(0, _finder)
    if loaded:
        register_now()


def uninstall() -> None:
    """Remove the import hook (registration done, or not wanted)."""
    with _lock:
        if _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
