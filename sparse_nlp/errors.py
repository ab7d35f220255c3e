"""The errors that mean "bad input" (as opposed to a bug), which the CLI prints as one line each."""

from __future__ import annotations

from .checkpoint import CheckpointError
from .compact import CompactFormatError
from .config import ConfigError
from .evaluation.data import DataError
from .metadata import MetadataError
from .pruning.masks import MaskShapeError
from .pruning.patterns import PatternError
from .registry import RegistryError
from .targets import TargetError, UnsupportedModelError

USER_ERRORS: tuple[type[Exception], ...] = (
    CheckpointError,
    CompactFormatError,
    ConfigError,
    DataError,
    FileNotFoundError,
    MaskShapeError,
    MetadataError,
    PatternError,
    RegistryError,
    TargetError,
    UnsupportedModelError,
)
