"""Sentence embeddings and STS-B: the quality check for encoders without a task head.

all-MiniLM-L6-v2 is a sentence-embedding model: mean-pooled token states compared by cosine. STS-B dev
Spearman (x100) of those cosines against the human scores is its standard quality number.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr
from torch import nn
from tqdm.auto import tqdm

from .data import load_glue_rows


@torch.no_grad()
def embed(
    model: nn.Module,
    tokenizer: Any,
    sentences: list[str],
    *,
    batch_size: int = 64,
    max_length: int = 128,
    progress: bool = False,
) -> torch.Tensor:
    """Mean-pooled (over non-padding tokens) last hidden states, shape (len(sentences), hidden).

    Sentences are batched in order of length (less padding to compute), and returned in the input order.
    """
    model.eval()
    base = getattr(model, "base_model", model)
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = []
    for start in tqdm(range(0, len(sentences), batch_size), desc="embedding", disable=not progress):
        batch = tokenizer(
            [sentences[i] for i in order[start : start + batch_size]],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
        hidden = base(**batch).last_hidden_state  # (B, T, H)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9))  # (B, H)
    if not out:
        return torch.zeros(0, 0)
    pooled = torch.cat(out)  # (N, H), sorted order
    result = torch.empty_like(pooled)
    result[torch.tensor(order, device=pooled.device)] = pooled
    return result


def stsb_scores(
    model: nn.Module,
    tokenizer: Any,
    *,
    data_dir: str | os.PathLike | None = None,
    split: str = "dev",
    batch_size: int = 64,
    max_length: int = 128,
    progress: bool = False,
) -> dict[str, float]:
    """STS-B Spearman and Pearson (x100) of cosine similarities of mean-pooled embeddings.

    Returns:
        ``{"spearman": ..., "pearson": ..., "pairs": n}``.
    """
    rows = load_glue_rows("stsb", split, data_dir)
    a = embed(model, tokenizer, rows["text"], batch_size=batch_size, max_length=max_length, progress=progress)
    b = embed(
        model, tokenizer, rows["text_pair"], batch_size=batch_size, max_length=max_length, progress=progress
    )
    cos = F.cosine_similarity(a, b).cpu().numpy()
    return {
        "spearman": float(spearmanr(cos, rows["label"]).statistic * 100),
        "pearson": float(pearsonr(cos, rows["label"]).statistic * 100),
        "pairs": len(cos),
    }
