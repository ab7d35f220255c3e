"""Perplexity of a causal LM on a text corpus, with the sliding-window protocol recorded beside the number.

The protocol is the usual one (the Hugging Face perplexity guide, the Wanda and SparseGPT papers): the whole
corpus is tokenized once (no special tokens added), cut into windows of `context` tokens starting every
`stride` tokens, and each window scores only the tokens no earlier window scored (the first window scores all
but its first token). Perplexity is ``exp`` of the mean negative log-likelihood over every scored token,
computed by the offline ``perplexity`` metric. With ``stride == context`` (the default) the windows do not
overlap and each scores ``context - 1`` tokens.

Perplexities are only comparable under the same protocol, so the result carries it: corpus, split, data
file, corpus tokens, windows, scored tokens, context and stride.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import ConfigError
from .corpora import PERPLEXITY_TASKS
from .data import TEXT_CORPORA, DataError, corpus_file, load_text
from .metrics import load_metric
from .tokens import encode_text

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Window:
    """One window: tokens [begin, end) go into the model, the tokens from `score_from` on are scored."""

    begin: int
    end: int
    score_from: (
        int  # absolute position of the first scored token (the model predicts it from the ones before)
    )


def windows(
    num_tokens: int, context: int, stride: int | None = None, max_windows: int | None = None
) -> list[Window]:
    """The sliding windows over `num_tokens` tokens (see the module docstring).

    Raises:
        ConfigError: a context below 2, a stride outside [1, context], or fewer than 2 tokens.
    """
    stride = context if stride is None else stride
    if context < 2:
        raise ConfigError(f"context must be at least 2 tokens, got {context}.")
    if not 1 <= stride <= context:
        raise ConfigError(f"stride must be in [1, context={context}], got {stride}.")
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"max_windows must be at least 1, got {max_windows}.")
    if num_tokens < 2:
        raise ConfigError(f"the text has {num_tokens} token(s); perplexity needs at least 2.")
    out: list[Window] = []
    scored_until = 1  # token 0 is never predicted
    for begin in range(0, num_tokens - 1, stride):
        end = min(begin + context, num_tokens)
        out.append(Window(begin, end, max(scored_until, begin + 1)))
        scored_until = end
        if end == num_tokens or (max_windows is not None and len(out) == max_windows):
            break
    return out


def token_nlls(
    model: nn.Module, ids: torch.Tensor, spans: list[Window], *, progress: bool = True
) -> torch.Tensor:
    """Negative log-likelihood (natural log) of every scored token, window after window, as one float64 vector."""
    device = next(model.parameters()).device
    out = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for w in tqdm(spans, desc="perplexity", unit="window", disable=not progress):
                window = ids[w.begin : w.end].unsqueeze(0).to(device)  # (1, T)
                logits = model(input_ids=window, use_cache=False).logits[0].float()  # (T, V)
                first = w.score_from - w.begin  # index in the window of the first scored token
                # logits at position t predict token t + 1
                nll = nn.functional.cross_entropy(
                    logits[first - 1 : -1], window[0, first:], reduction="none"
                )  # (T - first,)
                out.append(nll.double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def evaluate_perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str | torch.Tensor,
    *,
    context: int = 1024,
    stride: int | None = None,
    max_windows: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of `model` on `text` (a string, or a 1-D tensor of token ids) with sliding windows.

    Args:
        model: A causal LM (returns ``logits``).
        tokenizer: Tokenizes the text (without special tokens); unused for token ids.
        text: The corpus as one string, or its token ids.
        context: Tokens per window (default 1024).
        stride: Tokens between window starts (default `context`: no overlap).
        max_windows: Score only the first N windows.
        progress: Show a progress bar over windows.

    Returns:
        ``{"perplexity", "mean_nll", "scored_tokens", "corpus_tokens", "windows", "context", "stride",
        "max_windows"}``.
    """
    if torch.is_tensor(text):
        ids = text.reshape(-1).long()
    else:
        if tokenizer is None:
            raise ConfigError("perplexity of a text needs a tokenizer; the model folder has none.")
        ids = encode_text(tokenizer, text)  # (N,)
    stride = context if stride is None else stride
    spans = windows(len(ids), context, stride, max_windows)
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if positions is not None and context > positions:
        raise ConfigError(f"context {context} exceeds the model's {positions} positions; lower --context.")
    nll = token_nlls(model, ids, spans, progress=progress)
    metric = load_metric("perplexity").compute(predictions=nll.tolist())
    if not math.isfinite(metric["perplexity"]):
        logger.warning("perplexity is not finite (mean NLL %s)", metric["mean_nll"])
    return {
        "perplexity": metric["perplexity"],
        "mean_nll": metric["mean_nll"],
        "scored_tokens": len(nll),
        "corpus_tokens": len(ids),
        "windows": len(spans),
        "context": context,
        "stride": stride,
        "max_windows": max_windows,
    }


def perplexity_text(
    task: str | os.PathLike, *, split: str | None = None, data_dir: str | os.PathLike | None = None
) -> tuple[str, dict[str, str]]:
    """The text of a perplexity task (a corpus name or a ``.txt`` path) and where it came from.

    Returns:
        (text, ``{"task", "split", "data_file"}``); `data_file` is relative to the data directory for the
        shipped corpora, the file name for a ``.txt`` path, or ``hf:<dataset>:<split>`` for the Hub.
    """
    name = str(task)
    if name in PERPLEXITY_TASKS:
        split = split or PERPLEXITY_TASKS[name]
        if split not in TEXT_CORPORA[name]:
            raise ConfigError(f"task {name!r} has splits {', '.join(TEXT_CORPORA[name])}, not {split!r}.")
        text = load_text(name, split, data_dir)
        return text, {"task": name, "split": split, "data_file": corpus_file(name, split, data_dir)}
    path = Path(name).expanduser()
    if path.suffix != ".txt":
        raise ConfigError(
            f"unknown perplexity task {name!r}; use {', '.join(PERPLEXITY_TASKS)} or a .txt file."
        )
    if not path.is_file():
        raise DataError(f"text file {name!r} does not exist.")
    return path.read_text(encoding="utf-8"), {"task": "text", "split": "file", "data_file": path.name}


def is_perplexity_task(task: str) -> bool:
    """True for a corpus name of `PERPLEXITY_TASKS` or a ``.txt`` path."""
    return task in PERPLEXITY_TASKS or str(task).endswith(".txt")
