"""Real MiniLM: long-context conversion to 4096 positions with window + global CLS, saved and restored."""

from __future__ import annotations

import pytest
import torch

import sparse_nlp
from sparse_nlp.attention import apply_attention
from sparse_nlp.attention.long_context import extend_positions
from sparse_nlp.config import AttentionSparsity, SparsityConfig
from sparse_nlp.evaluation.data import load_text
from sparse_nlp.models import load_model

LONGFORMER = {
    "patterns": [
        {"pattern": "sliding_window", "options": {"window": 256}},
        {"pattern": "global_tokens", "options": {"positions": [0]}},
    ]
}


@pytest.mark.real
def test_minilm_long_context_blocked_equals_reference_and_round_trips(minilm_path, data_dir, tmp_path):
    model, tokenizer = load_model(minilm_path, task="base")
    model.eval()
    short = tokenizer(
        ["a short sentence about cats.", "another one, a bit longer, about dogs and cats."],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        dense_short = model(**short).last_hidden_state
    extend_positions(model, 4096)
    assert model.config.max_position_embeddings == 4096
    pos = model.embeddings.position_embeddings.weight
    assert torch.equal(pos[512:1024], pos[:512]) and torch.equal(pos[4095], pos[4095 % 512])
    sparse_nlp.sparsify(
        model,
        SparsityConfig(attention=AttentionSparsity("union", LONGFORMER, kernel="blocked")),
        progress=False,
    )
    with (
        torch.no_grad()
    ):  # sentences shorter than the window: the pattern is dense attention, tiling is invisible
        assert (model(**short).last_hidden_state - dense_short).abs().max() < 1e-4

    text = load_text("wikitext2", "test", data_dir)
    ids = tokenizer(text[:20000], return_tensors="pt")["input_ids"][:, :1500]
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        blocked = model(**x).last_hidden_state
        apply_attention(model, AttentionSparsity("union", LONGFORMER, kernel="reference"))
        reference = model(**x).last_hidden_state
        apply_attention(model, AttentionSparsity("union", LONGFORMER, kernel="blocked"))
    assert ids.shape[1] == 1500
    assert (blocked - reference).abs().max() < 1e-4

    sparse_nlp.save_pretrained(model, tmp_path / "long", tokenizer=tokenizer)
    loaded = sparse_nlp.from_pretrained(tmp_path / "long")
    loaded.eval()
    assert loaded.config.max_position_embeddings == 4096
    with torch.no_grad():
        assert torch.equal(loaded(**x).last_hidden_state, blocked)


@pytest.mark.real
def test_minilm_long_context_from_the_command_line(minilm_path, tmp_path, capsys):
    """`sparse-nlp sparsify --config` with attention.max_positions: the checkpoint holds 4,096 positions, the
    pattern, and a tokenizer that truncates at 4,096 tokens instead of the pretrained length."""
    import json

    from transformers import AutoTokenizer

    from sparse_nlp.cli import main

    config = tmp_path / "long.json"
    config.write_text(
        json.dumps({"attention": {"pattern": "union", "options": LONGFORMER, "max_positions": 4096}})
    )
    out = tmp_path / "minilm-4096"
    assert main(["sparsify", minilm_path, "--config", str(config), "--out", str(out), "--no-progress"]) == 0
    assert str(out) in capsys.readouterr().out
    assert AutoTokenizer.from_pretrained(out).model_max_length == 4096
    loaded = sparse_nlp.from_pretrained(out)
    assert loaded.config.max_position_embeddings == 4096
    assert loaded.config.sparse_attention["max_positions"] == 4096
    assert loaded.embeddings.position_embeddings.weight.shape[0] == 4096
