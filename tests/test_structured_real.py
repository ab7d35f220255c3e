"""Structured removal on the real MiniLM: equal to the zeroed dense model, bit-identical reload, and faster."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from sparse_nlp.checkpoint import from_pretrained, save_pretrained
from sparse_nlp.evaluation.speed import compare_speed
from sparse_nlp.structured import StructuredSparsity, apply_structured, model_layout, zero_units

pytestmark = pytest.mark.real


def test_minilm_structured_removal(minilm_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    dense = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()
    texts = ["a gripping, funny and wise film", "the plot is thin and the acting is worse"] * 4
    cfg = StructuredSparsity(
        heads=0.5, ffn=0.5, score="taylor", scope="global", options={"num_batches": 2, "batch_size": 4}
    )
    model = copy.deepcopy(dense)
    apply_structured(model, cfg, data=texts, tokenizer=tokenizer, progress=False)
    layout = model_layout(model)
    assert sum(x.head_units for x in layout) == 36 and sum(x.ffn for x in layout) == 6 * 1536 // 2
    # the same units zeroed in the dense model give the same output
    ref = copy.deepcopy(dense)
    heads = {}
    ffn = {}
    for i, lay in enumerate(layout):
        block_d, block_p = dense.bert.encoder.layer[i], model.bert.encoder.layer[i]
        kept_q = {tuple(r.tolist()) for r in block_p.attention.self.query.weight.detach()[:, :4]}
        heads[i] = [
            h
            for h in range(12)
            if tuple(block_d.attention.self.query.weight.detach()[h * 32, :4].tolist()) not in kept_q
        ]
        kept_f = {tuple(r.tolist()) for r in block_p.intermediate.dense.weight.detach()[:, :4]}
        ffn[i] = [
            n
            for n in range(1536)
            if tuple(block_d.intermediate.dense.weight.detach()[n, :4].tolist()) not in kept_f
        ]
        assert len(heads[i]) == 12 - lay.num_heads and len(ffn[i]) == 1536 - lay.ffn
    zero_units(ref, heads, ffn)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc).logits
        torch.testing.assert_close(out, ref(**enc).logits, rtol=1e-4, atol=1e-4)
    save_pretrained(model, tmp_path / "ckpt")
    loaded = from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(**enc).logits, out)
    rows = compare_speed(
        {"dense": dense, "pruned": model}, batches=[8], seqs=[128], warmup=1, repeats=5, threads=1
    )
    # half the heads and half the FFN: measured 1.7-1.95x here (batch 32); allow for a busy machine
    assert rows[1].ratio > 1.3
