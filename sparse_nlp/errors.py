"""The errors that mean "bad input" (as opposed to a bug), which the CLI prints as one line each."""

from __future__ import annotations

from .checkpoint import CheckpointError
from .commands.bench import BenchError
from .compact import CompactFormatError
from .config import ConfigError
from .evaluation.data import DataError
from .hub import HubError
from .metadata import MetadataError
from .pruning.masks import MaskShapeError
from .pruning.patterns import PatternError
from .registry import RegistryError
from .runtime.layer import SparseRuntimeError
from .structured.removal import StructuredError
from .targets import TargetError, UnsupportedModelError

USER_ERRORS: tuple[type[Exception], ...] = (
    BenchError,
    CheckpointError,
    CompactFormatError,
    ConfigError,
    DataError,
    FileNotFoundError,
    HubError,
    MaskShapeError,
    MetadataError,
    PatternError,
    RegistryError,
    SparseRuntimeError,
    StructuredError,
    TargetError,
    UnsupportedModelError,
)
