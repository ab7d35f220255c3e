"""Every error class of sparse_nlp, under one base `SparseNLPError`; this module imports nothing of ours.

Raising an error therefore never drags in an implementation, and callers can catch everything the package
raises with ``except SparseNLPError``. Each class keeps its standard base too (``ValueError``, ``KeyError``,
...), so ``except ValueError`` keeps working. The modules that raise an error also re-export it, so
``from sparse_nlp.checkpoint import CheckpointError`` works as well as ``from sparse_nlp.errors import ...``.
"""

from __future__ import annotations


class SparseNLPError(Exception):
    """The base of every error sparse_nlp raises on purpose."""


# ---- configs and names ------------------------------------------------------------------------------------


class ConfigError(SparseNLPError, ValueError):
    """A config field with a bad value; the message names the field (e.g. ``weights[0].sparsity``)."""


class ScheduleError(ConfigError):
    """A schedule with a bad field (the message names it)."""


class AttentionPatternError(ConfigError):
    """A pattern option with a bad value, or a pattern that does not fit the model or the input (a `ConfigError`)."""


class RegistryError(SparseNLPError, KeyError):
    """Raised for an unknown name or a name registered twice."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0]) if self.args else ""


class PatternError(SparseNLPError, ValueError):
    """A pattern string that is not one of the accepted forms."""


class UnsupportedModelError(SparseNLPError, ValueError):
    """The model's ``model_type`` has no entry in the targets table."""


class TargetError(SparseNLPError, ValueError):
    """A target selection that matches nothing or names an unknown group."""


# ---- applying sparsity ------------------------------------------------------------------------------------


class MaskShapeError(SparseNLPError, ValueError):
    """A layer whose shape cannot hold the requested pattern (e.g. in_features not a multiple of M)."""


class StructuredError(SparseNLPError, ValueError):
    """A structured-pruning request that cannot be applied (bad indices, unknown layout); the message says which."""


class KernelUnsupported(SparseNLPError, ValueError):
    """The blocked kernel cannot run this pattern or call (the caller falls back to the reference)."""


class FlexUnsupported(SparseNLPError, ValueError):
    """flex_attention cannot run this call (autograd, a cache, left padding, token ids)."""


# ---- files, data and the Hub ------------------------------------------------------------------------------


class MetadataError(SparseNLPError, ValueError):
    """The ``sparse_nlp`` entry of a config.json is malformed or from a newer format."""


class CheckpointError(SparseNLPError, ValueError):
    """A checkpoint that is missing, damaged, or disagrees with its own metadata (the message names the file)."""


class CompactFormatError(SparseNLPError, ValueError):
    """A compact weight file that is damaged, inconsistent, or from a newer sparse_nlp (the message names the file)."""


class DataError(SparseNLPError, FileNotFoundError):
    """A data set that cannot be found or read; the message lists what was looked for."""


class HubError(SparseNLPError, RuntimeError):
    """A push that the Hub (or the network) refused; the message says which repository and why."""


class BenchError(SparseNLPError, ValueError):
    """Bad benchmark arguments (shapes, threads, a sequence longer than a model accepts)."""


class SparseRuntimeError(SparseNLPError, ValueError):
    """A converted (inference-only) layer was used in a way it does not support: backward, a dtype or device."""


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
"""The errors that mean "bad input" (as opposed to a bug), which the CLI prints as one line each."""
