"""Sparse attention inside real transformers models of every family: padding, kernels, save/load, generate."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

import sparse_nlp
from sparse_nlp.attention import (
    ATTN_NAME,
    AttentionPatternError,
    apply_attention,
    long_context,
    remove_attention,
)
from sparse_nlp.attention.cache import SinkWindowCache
from sparse_nlp.config import AttentionSparsity, SparsityConfig, WeightSparsity
from sparse_nlp.errors import ConfigError

from .conftest import DECODERS, GENERATE_CACHE, tiny_inputs, tiny_model


def window_for(family: str, window: int, **kw) -> AttentionSparsity:
    return AttentionSparsity("sliding_window", {"window": window, "causal": family in DECODERS}, **kw)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_every_family_pattern_padding_and_kernels(family):
    model = tiny_model(family)
    x = tiny_inputs(batch=2, length=12)  # the last row is right-padded (9 real tokens)
    dense = logits(model, x)
    apply_attention(model, window_for(family, 1000, kernel="blocked"))
    assert model.config._attn_implementation == ATTN_NAME
    assert (logits(model, x) - dense).abs().max() < 1e-5  # a window wider than the input is dense attention
    apply_attention(model, window_for(family, 4, kernel="reference"))
    ref = logits(model, x)
    assert (ref - dense).abs().max() > 1e-5  # the pattern is applied
    apply_attention(model, window_for(family, 4, kernel="blocked", block_size=4))
    blocked = logits(model, x)
    assert (blocked - ref).abs().max() < 1e-5
    alone = logits(model, {"input_ids": x["input_ids"][1:, :9]})
    padded_row = blocked[1, :9] if family in DECODERS else blocked[1]
    assert (padded_row - alone[0]).abs().max() < 1e-5  # padding changes nothing for the real tokens
    remove_attention(model)
    assert model.config._attn_implementation == "sdpa" and "sparse_attention" not in model.config.to_dict()
    assert (logits(model, x) - dense).abs().max() < 1e-6


@pytest.mark.parametrize(("model_window", "kernel_ran"), [(4096, "blocked"), (3, "reference")])
def test_model_sliding_window_lets_the_blocked_kernel_run_when_wider(
    model_window, kernel_ran, monkeypatch, caplog, chosen
):
    """A Mistral config's own sliding_window (4,096 by default) removes nothing from a window-4 pattern, so the
    blocked kernel runs; a narrower one (3) must apply, so the reference kernel runs and says so once."""
    from sparse_nlp.attention import kernels

    monkeypatch.setattr(kernels, "_warned_extra", False)
    model = tiny_model("mistral", sliding_window=model_window)
    x = tiny_inputs(batch=2, length=12)
    outs = []
    for kernel in ("reference", "blocked"):
        apply_attention(model, window_for("mistral", 4, kernel=kernel, block_size=4))
        with caplog.at_level("WARNING", logger="sparse_nlp.attention.kernels"):
            outs.append(logits(model, x))
    assert (outs[0] - outs[1]).abs().max() < 1e-5
    assert chosen[-1] == kernel_ran
    warned = [r for r in caplog.records if "model's own attention mask" in r.getMessage()]
    assert len(warned) == (kernel_ran == "reference")


def test_left_padding_keeps_global_position_on_first_real_token():
    model = tiny_model("llama")
    apply_attention(model, AttentionSparsity("union", {"patterns": [
        {"pattern": "sliding_window", "options": {"window": 2, "causal": True}},
        {"pattern": "global_tokens", "options": {"positions": [0], "causal": True}},
    ]}, kernel="blocked", block_size=4))  # fmt: skip
    ids = torch.randint(3, 100, (1, 10), generator=torch.Generator().manual_seed(0))
    alone = logits(model, {"input_ids": ids})
    padded = {
        "input_ids": torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1),
        "attention_mask": torch.tensor([[0] * 3 + [1] * 10]),
        "position_ids": torch.tensor([[0] * 3 + list(range(10))]),
    }
    assert (logits(model, padded)[:, 3:] - alone).abs().max() < 1e-5


def test_training_gradients_blocked_equal_reference():
    grads = []
    for kernel in ("reference", "blocked"):
        model = tiny_model("bert")
        model.train()
        model.config.attention_probs_dropout_prob = 0.0
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        apply_attention(model, AttentionSparsity("union", {"patterns": [
            {"pattern": "sliding_window", "options": {"window": 4}},
            {"pattern": "global_tokens", "options": {"positions": [0]}},
        ]}, kernel=kernel, block_size=4))  # fmt: skip
        out = model(**tiny_inputs(batch=2, length=13), labels=torch.tensor([0, 1]))
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert (grads[0][name] - grads[1][name]).abs().max() < 1e-5, name


@pytest.mark.parametrize(("family", "head_size"), [("bert", 16), ("llama", 16)])
def test_torch_compile_runs_the_blocked_kernel_eagerly(family, head_size):
    """Under torch.compile the blocked kernel runs as an eager island (its plans and the native kernel's in-place
    ops are not traceable; the native ops on a view once failed in AOT autograd's functionalization). Head size 16
    takes the native kernel where it runs (else the flash-op path). Outputs and gradients equal eager."""
    model = tiny_model(family, hidden_size=4 * head_size, num_attention_heads=4)
    pattern = (
        {"pattern": "sink_window", "options": {"window": 6, "sinks": 2}}
        if family in DECODERS
        else {"pattern": "union", "options": {"patterns": [
            {"pattern": "sliding_window", "options": {"window": 4}},
            {"pattern": "global_tokens", "options": {"positions": [0]}},
        ]}}
    )  # fmt: skip
    apply_attention(
        model, AttentionSparsity(pattern["pattern"], pattern["options"], kernel="blocked", block_size=4)
    )
    x = tiny_inputs(batch=2, length=40)

    def step(run):
        model.zero_grad()
        out = run(**x).logits
        out.pow(2).mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    eager_out, eager_grads = step(model)
    torch._dynamo.reset()
    out, grads = step(torch.compile(model, backend="aot_eager"))
    assert (out - eager_out).abs().max() < 1e-5
    assert len(grads) == len(eager_grads)
    assert max((a - b).abs().max().item() for a, b in zip(grads, eager_grads)) < 1e-5


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "gpt2"])
def test_max_positions_extends_the_table_and_round_trips(tmp_path, family):
    """`AttentionSparsity.max_positions` tiles the learned position rows (after RoBERTa's two padding rows) before
    the pattern applies; the checkpoint restores the longer table, and applying the saved config again (as a load
    does) leaves it alone."""
    model = tiny_model(family)
    model.eval()
    table = model.base_model.get_submodule(long_context.POSITION_TABLES[family])
    old = table.weight.detach().clone()  # 128 rows
    offset = 2 if family == "roberta" else 0
    window = window_for(family, 8, max_positions=300)
    sparse_nlp.sparsify(model, SparsityConfig(attention=window), progress=False)
    new = model.base_model.get_submodule(long_context.POSITION_TABLES[family]).weight.detach()
    assert new.shape == (300, old.shape[1]) and long_context.token_positions(model) == 300 - offset
    assert torch.equal(new[:offset], old[:offset])
    rows = torch.arange(300 - offset) % (128 - offset) + offset
    assert torch.equal(new[offset:], old[rows])
    assert (model.config.n_positions if family == "gpt2" else model.config.max_position_embeddings) == 300
    x = tiny_inputs(batch=2, length=250)  # beyond the 128 positions the model started with
    before = logits(model, x)
    sparse_nlp.save_pretrained(model, tmp_path / "long")
    loaded = sparse_nlp.from_pretrained(tmp_path / "long")
    assert loaded.config.sparse_attention["max_positions"] == 300
    assert (logits(loaded, x) - before).abs().max() < 1e-5
    table = loaded.base_model.get_submodule(long_context.POSITION_TABLES[family])
    apply_attention(loaded, window)  # the same size again: nothing to extend
    assert loaded.base_model.get_submodule(long_context.POSITION_TABLES[family]) is table


def test_max_positions_is_written_only_when_set(tmp_path):
    """Without an extension the saved config has no max_positions key: the format older releases read."""
    model = tiny_model("bert")
    sparse_nlp.sparsify(model, SparsityConfig(attention=window_for("bert", 8)), progress=False)
    assert "max_positions" not in model.config.sparse_attention
    assert "max_positions" not in SparsityConfig(attention=window_for("bert", 8)).to_dict()["attention"]
    sparse_nlp.save_pretrained(model, tmp_path / "plain")
    for name in ("config.json", "sparsity_config.json"):
        assert "max_positions" not in (tmp_path / "plain" / name).read_text()
    assert (
        sparse_nlp.from_pretrained(tmp_path / "plain").config.sparse_attention
        == model.config.sparse_attention
    )
    extended = SparsityConfig(attention=window_for("bert", 8, max_positions=200))
    assert SparsityConfig.from_dict(extended.to_dict()).attention.max_positions == 200


def test_max_positions_before_calibration_keeps_frozen_table_frozen():
    """Positions are extended before calibration runs (its batches may be longer than the old table), and a frozen
    position table stays frozen."""
    model = tiny_model("bert")
    model.bert.embeddings.position_embeddings.weight.requires_grad_(False)
    ids = torch.randint(3, 100, (4, 200), generator=torch.Generator().manual_seed(0))  # 200 > 128 positions
    config = SparsityConfig(
        weights=[WeightSparsity(method="wanda", sparsity=0.5, targets=["ffn"])],
        attention=window_for("bert", 8, max_positions=256),
    )
    sparse_nlp.sparsify(model, config, data=[{"input_ids": ids}], seq_len=200, progress=False)
    table = model.bert.embeddings.position_embeddings.weight
    assert table.shape[0] == 256 and not table.requires_grad


@pytest.mark.parametrize(
    ("family", "max_positions", "message"),
    [
        ("llama", 300, "attention.max_positions: llama has no learned absolute position table"),
        ("bert", 64, "attention.max_positions is 64, below the 128 positions bert already holds"),
        ("bert", -1, "max_positions must be an integer >= 0"),
    ],
)
def test_max_positions_errors_name_the_field_and_change_nothing(family, max_positions, message):
    model = tiny_model(family)
    x = tiny_inputs(batch=1, length=12)
    before = logits(model, x)
    with pytest.raises(ConfigError, match=message):
        sparse_nlp.sparsify(
            model,
            SparsityConfig(attention=window_for(family, 8, max_positions=max_positions)),
            progress=False,
        )
    assert "sparse_attention" not in model.config.to_dict()
    assert torch.equal(logits(model, x), before)
    with pytest.raises(AttentionPatternError, match="max_positions must be an integer >= 0"):
        apply_attention(
            model, window_for(family, 8, max_positions=300.0)
        )  # straight in, not through validate
    assert torch.equal(logits(model, x), before)


def test_global_tokens_by_id():
    model = tiny_model("bert")
    x = tiny_inputs(batch=2, length=12, pad=False)
    x["input_ids"][0, 5] = 7
    x["input_ids"][1, 2] = 7
    x["input_ids"][x["input_ids"] == 7] = 7
    apply_attention(model, AttentionSparsity("union", {"patterns": [
        {"pattern": "sliding_window", "options": {"window": 2}},
        {"pattern": "global_tokens", "options": {"positions": [], "token_ids": [7]}},
    ]}, kernel="blocked", block_size=4))  # fmt: skip
    by_id = logits(model, x)
    for row in range(2):
        where = [int(i) for i in (x["input_ids"][row] == 7).nonzero()]
        apply_attention(model, AttentionSparsity("union", {"patterns": [
            {"pattern": "sliding_window", "options": {"window": 2}},
            {"pattern": "global_tokens", "options": {"positions": where}},
        ]}, kernel="reference"))  # fmt: skip
        by_pos = logits(model, {k: v[row : row + 1] for k, v in x.items()})
        assert (by_id[row] - by_pos[0]).abs().max() < 1e-5


def test_save_load_restores_pattern(tmp_path, family):
    model = tiny_model(family)
    x = tiny_inputs()
    cfg = SparsityConfig(attention=window_for(family, 4))
    sparse_nlp.sparsify(model, cfg, progress=False)
    want = logits(model, x)
    sparse_nlp.save_pretrained(model, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["attn_implementation"] == ATTN_NAME and saved["sparse_attention"]["options"]["window"] == 4
    loaded = sparse_nlp.from_pretrained(tmp_path / "m")
    loaded.eval()
    assert loaded.config._attn_implementation == ATTN_NAME
    assert torch.equal(logits(loaded, x), want)
    plain = (
        transformers.AutoModelForCausalLM
        if family in DECODERS
        else transformers.AutoModelForSequenceClassification
    )
    again = plain.from_pretrained(tmp_path / "m")  # after `import sparse_nlp` the config.json key is honoured
    again.eval()
    assert torch.equal(logits(again, x), want)
    sparse_nlp.to_dense(loaded)
    assert loaded.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("with_sparse_nlp", [False, True])
def test_plain_transformers_and_a_sparse_attention_checkpoint(tmp_path, with_sparse_nlp):
    """Without sparse_nlp plain transformers refuses the checkpoint loudly; after `import sparse_nlp` (which loads
    no model code itself) it loads it with the sparse attention, in a fresh process."""
    model = tiny_model("bert")
    sparse_nlp.sparsify(model, SparsityConfig(attention=window_for("bert", 4)), progress=False)
    sparse_nlp.save_pretrained(model, tmp_path / "m")
    load = f"m = transformers.AutoModelForSequenceClassification.from_pretrained({str(tmp_path / 'm')!r})\n"
    if with_sparse_nlp:
        code = (
            "import sys, sparse_nlp, transformers\n"
            "assert 'transformers.modeling_utils' not in sys.modules\n"
            f"{load}assert m.config._attn_implementation == {ATTN_NAME!r}, m.config._attn_implementation\n"
        )
    else:
        code = f"import sys, transformers\n{load}assert 'sparse_nlp' not in sys.modules\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if with_sparse_nlp:
        assert done.returncode == 0, done.stderr[-2000:]
    else:
        assert done.returncode != 0
        assert 'attn_implementation="sparse_nlp"' in done.stderr and "not supported" in done.stderr


@pytest.mark.parametrize("family", DECODERS)
def test_bidirectional_pattern_on_decoder_fails(family):
    model = tiny_model(family)
    with pytest.raises(AttentionPatternError, match="bidirectional.*causal decoder"):
        apply_attention(model, AttentionSparsity("sliding_window", {"window": 8}))
    with pytest.raises(AttentionPatternError, match="causal decoder"):
        sparse_nlp.sparsify(model, SparsityConfig(attention=AttentionSparsity("bigbird", {})), progress=False)
    assert model.config._attn_implementation != ATTN_NAME


def test_global_position_beyond_sequence_fails():
    model = tiny_model("bert")
    glob = {"pattern": "global_tokens", "options": {"positions": [20]}}
    apply_attention(
        model,
        AttentionSparsity(
            "union", {"patterns": [{"pattern": "sliding_window", "options": {"window": 4}}, glob]}
        ),
    )
    with pytest.raises(AttentionPatternError, match="position 20, beyond this input of 12 tokens"):
        model(**tiny_inputs(length=12))
    with pytest.raises(AttentionPatternError, match="beyond the 128 positions"):
        apply_attention(model, AttentionSparsity("global_tokens", {"positions": [200]}))


def test_window_zero_fails_before_touching_the_model():
    model = tiny_model("gpt2")
    with pytest.raises(AttentionPatternError, match=r"attention\.options\.window must be >= 1, got 0"):
        apply_attention(model, AttentionSparsity("sliding_window", {"window": 0, "causal": True}))
    with pytest.raises(sparse_nlp.ConfigError, match=r"attention\.options\.window"):
        sparse_nlp.sparsify(
            model, SparsityConfig(attention=AttentionSparsity("sink_window", {"window": -2})), progress=False
        )
    assert model.config._attn_implementation != ATTN_NAME


@pytest.mark.parametrize("family", DECODERS)
def test_generate_with_cache_equals_without_and_sink_cache_is_bounded(family):
    model = tiny_model(family)
    apply_attention(model, AttentionSparsity("sink_window", {"window": 5, "sinks": 2}))
    x = tiny_inputs(batch=2, length=8, pad=False)
    x["attention_mask"][1, :3] = 0  # left padding, as generate wants it
    kw = dict(
        max_new_tokens=12, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True
    )
    full = model.generate(**x, use_cache=False, **kw)
    cached = model.generate(**x, **kw)
    cache = SinkWindowCache(model, x["attention_mask"])
    bounded = model.generate(**x, **{GENERATE_CACHE: cache}, **kw)
    for run in (cached, bounded):
        assert torch.equal(run.sequences, full.sequences)
        for a, b in zip(run.logits, full.logits, strict=True):
            assert (a - b).abs().max() < 1e-4
    assert (
        cache.layers[0].keys.shape[-2] == 2 + 3 + 5 - 1
    )  # sinks + left padding + window - 1, after 20 tokens
    dense = tiny_model(family).generate(**x, **kw)
    assert any(
        (a - b).abs().max() > 1e-4 for a, b in zip(dense.logits, full.logits, strict=True)
    )  # pattern is live
