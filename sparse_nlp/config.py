"""`SparsityConfig`: one typed description of every kind of sparsity the package applies.

A config has one slot per kind of coupling it reduces:

- ``weights``    neuron to neuron: a list of weight-pruning rules (method, sparsity, pattern, targets);
- ``attention``  token to token: a sparse attention pattern and kernel;
- ``structured`` whole units: attention heads and FFN neurons removed;
- ``activation`` token to neuron, per token: dynamic activation sparsity (TEAL, CATS thresholds).

Configs round-trip through JSON exactly (``SparsityConfig.from_dict(c.to_dict()) == c``), carry a
format version, and validation errors name the field and the bad value. Names of methods and patterns
are resolved only through `sparse_nlp.registry`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import AttentionPatternError, ConfigError, PatternError, RegistryError
from .pruning.patterns import NM, parse_pattern
from .registry import (
    ACTIVATION_METHODS,
    ATTENTION_KERNELS,
    ATTENTION_PATTERNS,
    PRUNING_METHODS,
    STRUCTURED_SCORES,
    suggest,
)

FORMAT_VERSION = 1
"""Version of the config / checkpoint metadata format this release writes and the newest it reads."""

Scope = Literal["per-layer", "per-row", "global"]
"""How a weight rule's budget is shared: per layer, per output row, or over all its layers at once."""
StructuredScope = Literal["per-layer", "global"]
"""How a structured budget is shared: per layer or over all layers at once."""
Profile = Literal["uniform", "owl"]
"""How a weight rule spreads its budget over layers: evenly, or weighted by activation outliers (OWL)."""
TargetGroup = Literal["attention", "ffn", "all-linear"]
"""Named groups of Linear layers a rule may target (besides ``re:<regex>``)."""

SCOPES: tuple[str, ...] = typing.get_args(Scope)
STRUCTURED_SCOPES: tuple[str, ...] = typing.get_args(StructuredScope)
PROFILES: tuple[str, ...] = typing.get_args(Profile)
TARGET_GROUPS: tuple[str, ...] = typing.get_args(TargetGroup)
AUTO_KERNEL = "auto"
"""The attention kernel setting that lets `sparse_nlp.attention.kernels.choose_kernel` pick a registered kernel."""


def _check_fraction(path: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{path} must be a number in [0, 1), got {value!r}.")
    if not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"{path} must be in [0, 1) (a fraction of weights to remove), got {value!r}.")


def _as_list(value: Any) -> list:
    if isinstance(value, str):
        return [value]
    return list(value)


@dataclass
class WeightSparsity:
    """One weight-pruning rule: which Linear layers, which method, how sparse, in which pattern."""

    method: str = field(
        default="magnitude", metadata={"help": "Registered pruning method: magnitude, wanda, sparsegpt, ..."}
    )
    sparsity: float = field(
        default=0.5, metadata={"help": "Fraction of weights removed, in [0, 1). Fixed by N:M patterns."}
    )
    pattern: str = field(
        default="unstructured",
        metadata={"help": 'Pattern: "unstructured", "N:M" (e.g. "2:4") or "block:RxC".'},
    )
    scope: Scope = field(
        default="per-layer",
        metadata={
            "help": "Where the sparsity budget applies: per-layer, per-row (each output neuron) or global."
        },
    )
    targets: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": 'Groups ("attention", "ffn", "all-linear") and/or regexes written "re:<regex>".'},
    )
    exclude: list[str] = field(
        default_factory=list, metadata={"help": "Regexes of module names to leave dense."}
    )
    profile: Profile = field(
        default="uniform", metadata={"help": "Per-layer sparsity profile: uniform or owl (outlier-weighted)."}
    )
    options: dict[str, Any] = field(default_factory=dict, metadata={"help": "Method-specific options."})

    def __post_init__(self) -> None:
        self.targets = _as_list(self.targets)
        self.exclude = _as_list(self.exclude)

    def parsed_pattern(self, path: str = "weights[0]"):
        try:
            return parse_pattern(self.pattern)
        except PatternError as err:
            raise ConfigError(f"{path}.pattern: {err}") from None

    def validate(self, path: str = "weights[0]") -> None:
        try:
            PRUNING_METHODS.get(self.method)
        except RegistryError as err:
            raise ConfigError(f"{path}.method: {err}") from None
        _check_fraction(f"{path}.sparsity", self.sparsity)
        pattern = self.parsed_pattern(path)
        if isinstance(pattern, NM) and abs(self.sparsity - pattern.sparsity) > 1e-9:
            raise ConfigError(
                f"{path}.sparsity is {self.sparsity!r} but pattern {pattern} fixes it at {pattern.sparsity!r}; "
                f"set sparsity to {pattern.sparsity!r} or choose another pattern."
            )
        if self.scope not in SCOPES:
            raise ConfigError(
                f"{path}.scope must be one of {', '.join(SCOPES)}, got {self.scope!r}.{suggest(str(self.scope), list(SCOPES))}"
            )
        if isinstance(pattern, NM) and self.scope == "global":
            raise ConfigError(
                f"{path}.scope 'global' has no meaning for N:M pattern {pattern}; use per-layer."
            )
        if self.profile not in PROFILES:
            raise ConfigError(f"{path}.profile must be one of {', '.join(PROFILES)}, got {self.profile!r}.")
        if not self.targets:
            raise ConfigError(
                f"{path}.targets is empty; give a group ({', '.join(TARGET_GROUPS)}) or 're:<regex>'."
            )
        for i, target in enumerate(self.targets):
            if not isinstance(target, str):
                raise ConfigError(f"{path}.targets[{i}] must be a string, got {target!r}.")
            if not target.startswith("re:") and target not in TARGET_GROUPS:
                raise ConfigError(
                    f"{path}.targets[{i}] is {target!r}: use a group ({', '.join(TARGET_GROUPS)}) or a regex "
                    f"written 're:<regex>'.{suggest(target, list(TARGET_GROUPS))}"
                )


@dataclass
class AttentionSparsity:
    """A sparse attention pattern (token-to-token coupling), applied through transformers' attention registry."""

    pattern: str = field(
        default="sliding_window",
        metadata={
            "help": "Registered attention pattern: sliding_window, global_tokens, sink_window, bigbird, union, ..."
        },
    )
    options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Pattern options (window, positions, ...)."}
    )
    kernel: str = field(
        default=AUTO_KERNEL,
        metadata={"help": "Kernel: auto or a registered name (reference, blocked, flex)."},
    )
    block_size: int = field(
        default=0, metadata={"help": "Query block of the blocked kernel (0: 32 forward, 128 backward)."}
    )
    max_positions: int = field(
        default=0,
        metadata={
            "help": "Extend learned absolute position embeddings to this many positions by tiling the pretrained "
            "rows (the Longformer recipe: bert, roberta, distilbert, gpt2) before the pattern applies; 0 keeps "
            "the model's. Counted like max_position_embeddings: RoBERTa's include its 2 padding rows."
        },
    )

    def to_dict(self) -> dict[str, Any]:
        """Plain fields; `max_positions` only when set, so checkpoints without an extension stay readable by
        releases that predate the field."""
        out = dataclasses.asdict(self)
        if not out["max_positions"]:
            del out["max_positions"]
        return out

    def validate(self, path: str = "attention") -> None:
        try:
            ATTENTION_PATTERNS.get(self.pattern).from_options(self.options)
        except RegistryError as err:
            raise ConfigError(f"{path}.pattern: {err}") from None
        except AttentionPatternError as err:
            raise ConfigError(str(err).replace("attention.", f"{path}.", 1)) from None
        kernels = [AUTO_KERNEL, *ATTENTION_KERNELS.names()]
        if self.kernel not in kernels:
            raise ConfigError(
                f"{path}.kernel must be one of {', '.join(kernels)}, got {self.kernel!r}.{suggest(str(self.kernel), kernels)}"
            )
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 0:
            raise ConfigError(
                f"{path}.block_size must be an integer >= 0 (0: default), got {self.block_size!r}."
            )
        if (
            isinstance(self.max_positions, bool)
            or not isinstance(self.max_positions, int)
            or self.max_positions < 0
        ):
            raise ConfigError(
                f"{path}.max_positions must be an integer >= 0 (0: keep the model's), got {self.max_positions!r}."
            )


@dataclass
class StructuredSparsity:
    """Structured removal of whole attention heads and FFN neurons (shrinks the matrices)."""

    heads: float = field(
        default=0.0, metadata={"help": "Fraction of attention heads (KV groups for GQA) removed."}
    )
    ffn: float = field(default=0.0, metadata={"help": "Fraction of FFN intermediate neurons removed."})
    score: str = field(
        default="weight-norm", metadata={"help": "Importance score: weight-norm, taylor, movement."}
    )
    scope: StructuredScope = field(default="global", metadata={"help": "Budget per-layer or global."})
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self, path: str = "structured") -> None:
        _check_fraction(f"{path}.heads", self.heads)
        _check_fraction(f"{path}.ffn", self.ffn)
        if self.scope not in STRUCTURED_SCOPES:
            raise ConfigError(f"{path}.scope must be per-layer or global, got {self.scope!r}.")
        try:
            STRUCTURED_SCORES.get(self.score)
        except RegistryError as err:
            raise ConfigError(f"{path}.score: {err}") from None


ALLOCATIONS: tuple[str, ...] = ("uniform", "greedy")
"""How TEAL spreads its sparsity over the Linear inputs of a block: the same everywhere, or greedily by output error."""


@dataclass
class ActivationSparsity:
    """Dynamic activation sparsity: per token, inputs below a calibrated magnitude threshold are set to zero.

    ``teal`` thresholds the input of every targeted Linear layer (TEAL); ``cats`` thresholds the gate activation
    ``act(gate(x))`` of gated FFNs (CATS). Thresholds come from quantiles of activation magnitudes on calibration
    data, so `sparsity` is the fraction of values zeroed on data like it. ``moefication`` splits each FFN's neurons
    into experts and keeps a few per token; there `sparsity` is the fraction of experts skipped.
    """

    method: str = field(
        default="teal", metadata={"help": "Registered activation method: teal, cats or moefication."}
    )
    sparsity: float = field(
        default=0.5,
        metadata={
            "help": "Fraction of activations set to zero (moefication: of experts skipped), in [0, 1)."
        },
    )
    targets: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={
            "help": 'Groups ("attention", "ffn", "all-linear") and/or regexes "re:<regex>" of Linear layers; '
            "for cats, the FFNs that hold a selected layer."
        },
    )
    exclude: list[str] = field(default_factory=list, metadata={"help": "Regexes of module names left dense."})
    options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": 'Method options; teal: {"allocation": "uniform" | "greedy", "step": 0.05}.'},
    )

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if isinstance(self.exclude, str):
            self.exclude = [self.exclude]

    def problems(self, path: str = "activation") -> list[str]:
        """Every bad field, each named (empty when the part is valid)."""
        out: list[str] = []
        method = None
        try:
            method = ACTIVATION_METHODS.get(self.method)
        except RegistryError as err:
            out.append(f"{path}.method: {err}")
        try:
            _check_fraction(f"{path}.sparsity", self.sparsity)
        except ConfigError as err:
            out.append(str(err).replace("of weights to remove", "of activations to zero"))
        if not isinstance(self.targets, list) or not self.targets:
            out.append(f"{path}.targets is empty; give a group ({', '.join(TARGET_GROUPS)}) or 're:<regex>'.")
        else:
            for i, target in enumerate(self.targets):
                if not isinstance(target, str) or (
                    not target.startswith("re:") and target not in TARGET_GROUPS
                ):
                    out.append(
                        f"{path}.targets[{i}] is {target!r}: use a group ({', '.join(TARGET_GROUPS)}) or a regex "
                        f"written 're:<regex>'.{suggest(str(target), list(TARGET_GROUPS))}"
                    )
        if not isinstance(self.exclude, list) or not all(isinstance(x, str) for x in self.exclude):
            out.append(f"{path}.exclude must be a list of regexes, got {self.exclude!r}.")
        if not isinstance(self.options, dict):
            out.append(f"{path}.options must be a mapping, got {self.options!r}.")
        elif method is not None:
            out.extend(method.option_problems(self.options, f"{path}.options"))
        return out

    def validate(self, path: str = "activation") -> None:
        """Raise `ConfigError` naming every bad field at once."""
        found = self.problems(path)
        if found:
            raise ConfigError(found[0] if len(found) == 1 else f"{len(found)} problems: " + " ".join(found))


@dataclass
class SparsityConfig:
    """Everything sparse about a model; what `sparse_nlp.sparsify` applies and checkpoints record.

    Example:
        >>> SparsityConfig(weights=[WeightSparsity(method="magnitude", sparsity=0.5, targets=["ffn"])])
    """

    weights: list[WeightSparsity] = field(default_factory=list)
    attention: AttentionSparsity | None = None
    structured: StructuredSparsity | None = None
    activation: ActivationSparsity | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.weights, WeightSparsity):
            self.weights = [self.weights]
        self.weights = list(self.weights)

    @classmethod
    def magnitude(
        cls, sparsity: float, *, targets: str | list[str] = "all-linear", **kwargs: Any
    ) -> SparsityConfig:
        """Shortcut for one magnitude-pruning rule: ``SparsityConfig.magnitude(0.5, targets="ffn")``."""
        return cls(weights=[WeightSparsity(method="magnitude", sparsity=sparsity, targets=targets, **kwargs)])

    def validate(self) -> SparsityConfig:
        """Check every field; raises `ConfigError` naming the first bad field. Returns self."""
        if not isinstance(self.format_version, int) or isinstance(self.format_version, bool):
            raise ConfigError(f"format_version must be an integer, got {self.format_version!r}.")
        if self.format_version > FORMAT_VERSION:
            raise ConfigError(
                f"format_version {self.format_version} is newer than this sparse_nlp understands "
                f"(<= {FORMAT_VERSION}); upgrade sparse_nlp (pip install -U sparse-nlp)."
            )
        for i, rule in enumerate(self.weights):
            rule.validate(f"weights[{i}]")
        for name in ("attention", "structured", "activation"):
            part = getattr(self, name)
            if part is not None:
                part.validate(name)
        return self

    def is_empty(self) -> bool:
        return (
            not self.weights
            and self.attention is None
            and self.structured is None
            and self.activation is None
        )

    # ---- JSON round trip ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-ready dict; parts that are absent are left out."""
        out: dict[str, Any] = {"format_version": self.format_version}
        if self.weights:
            out["weights"] = [dataclasses.asdict(w) for w in self.weights]
        for name in ("attention", "structured", "activation"):
            part = getattr(self, name)
            if part is not None:
                out[name] = (
                    part.to_dict() if isinstance(part, AttentionSparsity) else dataclasses.asdict(part)
                )
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, validate: bool = True) -> SparsityConfig:
        """Build (and by default validate) a config from a dict; unknown keys fail with their name."""
        if not isinstance(data, dict):
            raise ConfigError(f"a sparsity config must be a JSON object, got {type(data).__name__}.")
        version = data.get("format_version", FORMAT_VERSION)
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise ConfigError(
                f"format_version {version} is newer than this sparse_nlp understands (<= {FORMAT_VERSION}); "
                "upgrade sparse_nlp (pip install -U sparse-nlp)."
            )
        config = _build(cls, data, "")
        return config.validate() if validate else config

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> SparsityConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"sparsity config is not valid JSON: {err}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SparsityConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sparsity config file {str(path)!r} does not exist.")
        try:
            return cls.from_json(path.read_text())
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None


# ---- typed construction from plain data ----------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check `value` against the annotation `tp` (the few kinds our configs use) and convert nested parts."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{path}: {value!r} does not fit {_type_name(tp)}."
        )
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if (
        origin is typing.Literal
    ):  # a string choice: its value is checked by validate(), which suggests the closest
        tp = str
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str) and item_tp is str:
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path} must be a list, got {value!r}.")
        return [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}.")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path} must be a number, got {value!r}.")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}.")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}.")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}.")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {path}")  # a bug in this module, not user input


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__} must be a mapping of fields, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in names:
            raise ConfigError(
                f"unknown field {where!r}.{suggest(str(key), names)} Known fields here: {', '.join(names)}."
            )
        kwargs[key] = _convert(hints[key], value, where)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path else str(err)) from None
