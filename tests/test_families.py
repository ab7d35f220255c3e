"""The newer families (Qwen3, Gemma 2/3, Phi-3, OLMo 2, ELECTRA, DeBERTa-v2, ModernBERT), the inferred
layout for families outside the table, user-given layouts, and the generated support page."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
import transformers

import sparse_nlp
from sparse_nlp.attention.apply import apply_attention
from sparse_nlp.config import AttentionSparsity, SparsityConfig, StructuredSparsity, WeightSparsity
from sparse_nlp.pruning.masking import get_mask, masked_modules
from sparse_nlp.pruning.masks import num_pruned
from sparse_nlp.structured import remove_units, zero_units
from sparse_nlp.targets import (
    TARGETS,
    ModelTargets,
    TargetError,
    UnsupportedModelError,
    is_transposed,
    linear_weight,
    model_targets,
    select_modules,
)
from sparse_nlp.targets_docs import render_families_page

from .conftest import TINY_DECODER, TINY_ENCODER, VOCAB, tiny_inputs

NEW_DECODERS = ("qwen3", "gemma2", "gemma3_text", "phi3", "olmo2")
NEW_ENCODERS = ("electra", "deberta-v2", "modernbert")
NEW_FAMILIES = NEW_DECODERS + NEW_ENCODERS

_DECODER = dict(TINY_DECODER, vocab_size=VOCAB)
_ENCODER = dict(TINY_ENCODER, vocab_size=VOCAB, pad_token_id=0)


def family_config(family: str, **overrides):
    """A 2-layer random config of a new family, with each family's own quirks switched on."""
    if family == "qwen3":
        config = transformers.Qwen3Config(**_DECODER, head_dim=8)
    elif family == "gemma2":  # soft-capping and alternating local/global layers are Gemma 2 defaults
        config = transformers.Gemma2Config(**_DECODER, head_dim=8, sliding_window=6)
    elif family == "gemma3_text":
        config = transformers.Gemma3TextConfig(
            **_DECODER, head_dim=8, sliding_window=6, layer_types=["sliding_attention", "full_attention"]
        )
    elif family == "phi3":
        config = transformers.Phi3Config(**_DECODER)
    elif family == "olmo2":
        config = transformers.Olmo2Config(**_DECODER)
    elif family == "electra":
        config = transformers.ElectraConfig(**_ENCODER, embedding_size=16)  # embeddings projected up
    elif family == "deberta-v2":  # DeBERTa-v3's relative attention settings
        config = transformers.DebertaV2Config(
            **_ENCODER,
            relative_attention=True,
            pos_att_type=["p2c", "c2p"],
            position_biased_input=False,
            max_relative_positions=-1,
            position_buckets=16,
            share_att_key=True,
            norm_rel_ebd="layer_norm",
        )
    elif family == "modernbert":
        config = transformers.ModernBertConfig(
            **_ENCODER,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
            local_attention=4,
            global_attn_every_n_layers=2,
        )
    else:
        raise KeyError(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def family_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    auto = (
        transformers.AutoModelForCausalLM
        if family in NEW_DECODERS
        else transformers.AutoModelForSequenceClassification
    )
    return auto.from_config(family_config(family)).eval()


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def id_batches(n: int = 4, length: int = 12) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, VOCAB, (2, length), generator=g)} for _ in range(n)]


def check_exact_sparsity(model, pattern: str) -> None:
    masked = dict(masked_modules(model))
    assert set(masked) == set(select_modules(model, "all-linear"))
    for name, module in masked.items():
        mask = get_mask(module)
        mask_oi = mask.t() if is_transposed(module) else mask  # (out, in)
        w = linear_weight(module)
        assert torch.all(w[~mask_oi] == 0), name
        if pattern == "2:4":
            kept = mask_oi.reshape(mask_oi.shape[0], -1, 4).sum(-1)  # (out, in/4)
            assert torch.all(kept == 2), name
        else:
            assert int((~mask_oi).sum()) == num_pruned(0.5, w.numel()), name


# ---- the table entries --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_weights_reach_the_target(family, method, pattern):
    model = family_model(family)
    rule = WeightSparsity(method=method, sparsity=0.5, pattern=pattern)
    data = None if method == "magnitude" else id_batches()
    sparse_nlp.sparsify(model, SparsityConfig(weights=[rule]), data=data, progress=False)
    check_exact_sparsity(model, pattern)
    assert torch.isfinite(logits(model, tiny_inputs())).all()


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_save_load_is_bit_identical(family, tmp_path):
    model = family_model(family)
    sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.5, scope="per-row"), progress=False)
    inputs = tiny_inputs()
    expected = logits(model, inputs)
    sparse_nlp.save_pretrained(model, tmp_path / "ckpt")
    loaded = sparse_nlp.from_pretrained(tmp_path / "ckpt")
    assert type(loaded) is type(model)
    assert torch.equal(logits(loaded, inputs), expected)
    before = {n: get_mask(m) for n, m in masked_modules(model)}
    after = {n: get_mask(m) for n, m in masked_modules(loaded)}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    plain = type(model).from_pretrained(tmp_path / "ckpt").eval()
    assert torch.equal(logits(plain, inputs), expected)
    assert list(masked_modules(plain)) == []
    if family in NEW_DECODERS:
        prompt = tiny_inputs(batch=1, length=6)
        kwargs = dict(max_new_tokens=6, do_sample=False, use_cache=True)
        tokens = model.generate(**prompt, **kwargs)
        assert torch.equal(loaded.generate(**prompt, **kwargs), tokens)
        assert tokens.shape[1] == 12


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_zeros_survive_adamw_with_weight_decay(family):
    model = family_model(family)
    model.train()
    sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.6), progress=False)
    pruned = {n: (m.weight == 0).clone() for n, m in masked_modules(model)}
    start = {n: m.weight.detach().clone() for n, m in masked_modules(model)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    batch = tiny_inputs(batch=4, length=10, pad=False)
    labels = batch["input_ids"] if family in NEW_DECODERS else torch.tensor([0, 1, 1, 0])
    for _ in range(3):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, module in masked_modules(model):
        assert torch.all(module.weight[pruned[name]] == 0.0), name
        assert not torch.equal(module.weight, start[name]), name


STRUCTURED = {f for f in NEW_FAMILIES if not TARGETS[f].no_structured}
ATTENTION = {f for f in NEW_FAMILIES if not TARGETS[f].no_attention}


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_structured_removal_is_exact_or_refused(family):
    model = family_model(family)
    if family in STRUCTURED:
        reference = copy.deepcopy(model)
        heads, ffn = {0: [1]}, {0: [0, 3, 7], 1: [2, 4]}
        zero_units(reference, heads, ffn)
        remove_units(model, heads, ffn)
        inputs = tiny_inputs()
        torch.testing.assert_close(logits(model, inputs), logits(reference, inputs), rtol=1e-5, atol=1e-5)
        return
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = SparsityConfig(structured=StructuredSparsity(heads=0.25, ffn=0.25))
    with pytest.raises(UnsupportedModelError, match=f"structured removal is not available for {family}: .+"):
        sparse_nlp.sparsify(model, config, progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing changed


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_attention_patterns_are_exact_or_refused(family):
    model = family_model(family)
    causal = family in NEW_DECODERS
    if family not in ATTENTION:
        with pytest.raises(UnsupportedModelError, match=f"sparse attention is not available for {family}"):
            apply_attention(model, AttentionSparsity("sliding_window", {"window": 4, "causal": causal}))
        return
    x = tiny_inputs(batch=2, length=12)
    dense = logits(model, x)
    apply_attention(model, AttentionSparsity("sliding_window", {"window": 1000, "causal": causal}))
    assert (logits(model, x) - dense).abs().max() < 1e-5  # wider than the input: dense attention
    apply_attention(model, AttentionSparsity("sliding_window", {"window": 2, "causal": causal}))
    assert (logits(model, x) - dense).abs().max() > 1e-6  # the pattern reaches the attention


# ---- families outside the table -----------------------------------------------------------------------


def _opt():
    config = transformers.OPTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        word_embed_proj_dim=32,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )
    return transformers.OPTForCausalLM(config).eval()


def _neox():
    config = transformers.GPTNeoXConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return transformers.GPTNeoXForCausalLM(config).eval()


def _t5_encoder():
    config = transformers.T5Config(d_model=32, d_kv=8, num_layers=2, num_heads=4, d_ff=64, vocab_size=VOCAB)
    return transformers.T5EncoderModel(config).eval()


INFERRED = {
    "opt": (_opt, "decoder.layers", ("self_attn.q_proj", "self_attn.out_proj", ("fc1",), "fc2")),
    "gpt_neox": (
        _neox,
        "layers",
        ("attention.query_key_value", "attention.dense", ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h"),
    ),
    "t5": (
        _t5_encoder,
        "encoder.block",
        (
            "layer.0.SelfAttention.q",
            "layer.0.SelfAttention.o",
            ("layer.1.DenseReluDense.wi",),
            "layer.1.DenseReluDense.wo",
        ),
    ),
}


@pytest.mark.parametrize("model_type", sorted(INFERRED))
def test_inferred_layout_names_the_right_layers(model_type, caplog):
    build, layers, (first, o, ffn_in, ffn_out) = INFERRED[model_type]
    model = build()
    assert model.config.model_type == model_type and model_type not in TARGETS
    with caplog.at_level(logging.WARNING, logger="sparse_nlp.targets"):
        entry = model_targets(model)
        model_targets(model)
    notices = [r for r in caplog.records if "inferred" in r.getMessage()]
    assert len(notices) == 1 and model_type in notices[0].getMessage()  # one line, once per model
    assert entry.inferred and entry.layers == layers
    assert first in (entry.q, entry.qkv) and entry.o == o
    assert entry.ffn_in == ffn_in and entry.ffn_out == ffn_out


@pytest.mark.parametrize("model_type", sorted(INFERRED))
@pytest.mark.parametrize(
    ("method", "pattern"), [("magnitude", "2:4"), ("wanda", "unstructured"), ("sparsegpt", "2:4")]
)
def test_inferred_family_prunes_and_round_trips(model_type, method, pattern, tmp_path):
    model = INFERRED[model_type][0]()
    data = None if method == "magnitude" else id_batches()
    rule = WeightSparsity(method=method, sparsity=0.5, pattern=pattern)
    sparse_nlp.sparsify(model, SparsityConfig(weights=[rule]), data=data, progress=False)
    check_exact_sparsity(model, pattern)
    expected = (
        model(**tiny_inputs()).last_hidden_state if model_type == "t5" else logits(model, tiny_inputs())
    )
    sparse_nlp.save_pretrained(model, tmp_path / "ckpt")
    loaded = sparse_nlp.from_pretrained(tmp_path / "ckpt")
    again = loaded(**tiny_inputs()).last_hidden_state if model_type == "t5" else logits(loaded, tiny_inputs())
    assert torch.equal(again, expected)
    assert {n for n, _ in masked_modules(loaded)} == {n for n, _ in masked_modules(model)}


def test_inferred_layout_refuses_structured_and_attention():
    model = _opt()
    with pytest.raises(
        UnsupportedModelError, match="structured removal is not available for opt: the layout is inferred"
    ):
        sparse_nlp.sparsify(model, SparsityConfig(structured=StructuredSparsity(heads=0.25)), progress=False)
    with pytest.raises(UnsupportedModelError, match="sparse attention is not available for opt"):
        apply_attention(model, AttentionSparsity("sliding_window", {"window": 4, "causal": True}))


def test_a_layout_that_cannot_be_inferred_is_refused_with_the_reason():
    config = transformers.T5Config(d_model=16, d_kv=4, num_layers=1, num_heads=4, d_ff=32, vocab_size=50)
    model = transformers.T5ForConditionalGeneration(config)  # decoder blocks hold two attentions
    with pytest.raises(
        UnsupportedModelError, match="cannot infer the layout of model_type 't5'.+use_targets"
    ):
        sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.5), progress=False)
    with pytest.raises(UnsupportedModelError, match="'t5' is not in the targets table"):
        model_targets("t5")


def test_user_layout_from_python_and_json(tmp_path):
    entry = ModelTargets(
        layers="decoder.layers",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        o="self_attn.out_proj",
        ffn_in=("fc1",),
        ffn_out="fc2",
        attention="self_attn",
        causal=True,
    )
    model = _opt()
    sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.5, targets="ffn"), targets=entry, progress=False)
    assert {n.rsplit(".", 1)[-1] for n, _ in masked_modules(model)} == {"fc1", "fc2"}
    assert not model_targets(model).inferred

    path = tmp_path / "targets.json"
    path.write_text(json.dumps(entry.to_dict()))
    assert ModelTargets.load(path) == entry
    other = _opt()
    sparse_nlp.sparsify(
        other, SparsityConfig.magnitude(0.5, targets="attention"), targets=path, progress=False
    )
    assert len(list(masked_modules(other))) == 8
    path.write_text(json.dumps({**entry.to_dict(), "mlp": "x"}))
    with pytest.raises(TargetError, match=r"targets.json: unknown field\(s\) \['mlp'\]"):
        ModelTargets.load(path)
    with pytest.raises(TargetError, match="targets.layers 'blocks' is not a module"):
        sparse_nlp.sparsify(
            _opt(), SparsityConfig.magnitude(0.5), targets={**entry.to_dict(), "layers": "blocks"}
        )


def test_cli_targets_file(tmp_path, capsys):
    from sparse_nlp.cli import main

    model = _opt()
    model.save_pretrained(tmp_path / "opt")
    entry = model_targets(_opt())
    (tmp_path / "t.json").write_text(json.dumps(entry.to_dict() | {"inferred": False}))
    code = main(
        [
            "sparsify",
            str(tmp_path / "opt"),
            "--targets",
            "ffn",
            "--targets-file",
            str(tmp_path / "t.json"),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert code == 0
    loaded = sparse_nlp.from_pretrained(tmp_path / "out")
    assert {n.rsplit(".", 1)[-1] for n, _ in masked_modules(loaded)} == {"fc1", "fc2"}


# ---- the generated support page -------------------------------------------------------------------------


def test_docs_page_equals_its_rendering():
    page = Path(__file__).resolve().parents[1] / "docs" / "families.md"
    assert page.read_text(encoding="utf-8") == render_families_page(), (
        "docs/families.md is stale: run python -m sparse_nlp.targets_docs docs/families.md"
    )
    for family in NEW_FAMILIES:
        assert f"| `{family}` |" in page.read_text(encoding="utf-8")


# ---- mixture-of-experts: fused 3-D experts ----------------------------------------------------------------

MOE = ("mixtral", "qwen2_moe", "qwen3_moe")


def moe_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    if family == "mixtral":
        config = transformers.MixtralConfig(**_DECODER, num_local_experts=4, num_experts_per_tok=2)
    elif family == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(
            **_DECODER,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
        )
    else:
        config = transformers.Qwen3MoeConfig(
            **_DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32
        )
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def expert_masks(model) -> dict[str, torch.Tensor]:
    from sparse_nlp.pruning.experts import masked_experts

    return {name: mask.clone() for name, _, _, mask in masked_experts(model)}


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_expert_slice_reaches_the_target_and_the_router_stays_dense(family, pattern):
    model = moe_model(family)
    router = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")}
    rule = WeightSparsity(method="magnitude", sparsity=0.5, pattern=pattern)
    sparse_nlp.sparsify(model, SparsityConfig(weights=[rule]), progress=False)
    masks = expert_masks(model)
    assert sorted(n.split("layers.")[1] for n in masks) == [
        f"{i}.mlp.experts.{p}" for i in range(2) for p in ("down_proj", "gate_up_proj")
    ]
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.all(params[name][~mask] == 0), name
        for e in range(mask.shape[0]):  # every expert on its own
            if pattern == "2:4":
                assert torch.all(mask[e].reshape(mask.shape[1], -1, 4).sum(-1) == 2), name
            else:
                assert int((~mask[e]).sum()) == num_pruned(0.5, mask[e].numel()), name
    assert all(torch.equal(params[n], w) for n, w in router.items()) and router
    linear = {n.rsplit(".", 1)[-1] for n, _ in masked_modules(model)}
    assert {"q_proj", "o_proj"} <= linear and ("down_proj" in linear) == (family == "qwen2_moe")
    assert torch.isfinite(logits(model, tiny_inputs())).all()
    result = sparse_nlp.report(model)
    experts = [r for r in result.rows if ".experts." in r.name]
    assert len(experts) == 4 and all(r.masked and r.group == "ffn" and len(r.shape) == 3 for r in experts)
    assert result.groups["ffn"].sparsity == pytest.approx(0.5)  # experts (and shared expert) at the target


@pytest.mark.parametrize("family", MOE)
def test_experts_save_load_generate_and_train(family, tmp_path):
    model = moe_model(family)
    sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.5, targets="ffn"), progress=False)
    inputs = tiny_inputs()
    expected = logits(model, inputs)
    sparse_nlp.save_pretrained(model, tmp_path / "ckpt")
    loaded = sparse_nlp.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(logits(loaded, inputs), expected)
    before, after = expert_masks(model), expert_masks(loaded)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    plain = type(model).from_pretrained(tmp_path / "ckpt").eval()
    assert torch.equal(logits(plain, inputs), expected) and not expert_masks(plain)
    prompt = tiny_inputs(batch=1, length=6)
    kwargs = dict(max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(loaded.generate(**prompt, **kwargs), model.generate(**prompt, **kwargs))

    loaded.train()
    params = dict(loaded.named_parameters())
    start = {n: params[n].detach().clone() for n in after}
    optimizer = torch.optim.AdamW(loaded.parameters(), lr=1e-2, weight_decay=0.01)
    batch = tiny_inputs(batch=4, length=10, pad=False)
    for _ in range(3):
        loaded(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, mask in after.items():
        assert torch.all(params[name][~mask] == 0), name
        assert torch.all(optimizer.state[params[name]]["exp_avg"][~mask] == 0), name
        assert not torch.equal(params[name], start[name]), name

    sparse_nlp.to_dense(loaded)
    assert not expert_masks(loaded) and list(masked_modules(loaded)) == []


def test_experts_refuse_owl_match_dense_structured_and_global_with_reasons():
    model = moe_model("mixtral")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    owl = SparsityConfig(weights=[WeightSparsity(method="wanda", sparsity=0.5, profile="owl")])
    with pytest.raises(
        UnsupportedModelError, match=r"weights\[0\]: profile 'owl' is not available on the experts of mixtral"
    ):
        sparse_nlp.sparsify(model, owl, data=id_batches(), progress=False)
    refit = WeightSparsity(method="sparsegpt", sparsity=0.5, options={"match_dense": True})
    with pytest.raises(UnsupportedModelError, match="option match_dense is not available on the experts"):
        sparse_nlp.sparsify(model, SparsityConfig(weights=[refit]), data=id_batches(), progress=False)
    with pytest.raises(
        UnsupportedModelError, match="structured removal is not available for mixtral: experts are fused"
    ):
        sparse_nlp.sparsify(model, SparsityConfig(structured=StructuredSparsity(ffn=0.25)), progress=False)
    with pytest.raises(sparse_nlp.ConfigError, match="scope 'global' is not available on mixture-of-experts"):
        sparse_nlp.sparsify(model, SparsityConfig.magnitude(0.5, scope="global"), progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing changed
    # the attention layers still take the calibrated methods
    attention_only = SparsityConfig(
        weights=[WeightSparsity(method="wanda", sparsity=0.5, targets=["attention"])]
    )
    sparse_nlp.sparsify(model, attention_only, data=id_batches(), progress=False)
    assert len(list(masked_modules(model))) == 8 and not expert_masks(model)


@pytest.mark.parametrize("family", MOE)
def test_experts_family_takes_attention_patterns(family):
    model = moe_model(family)
    x = tiny_inputs(batch=2, length=12)
    dense = logits(model, x)
    apply_attention(model, AttentionSparsity("sliding_window", {"window": 1000, "causal": True}))
    assert (logits(model, x) - dense).abs().max() < 1e-5
    apply_attention(model, AttentionSparsity("sliding_window", {"window": 2, "causal": True}))
    assert (logits(model, x) - dense).abs().max() > 1e-6


def test_gradual_pruning_of_experts_follows_the_schedule_per_slice(tmp_path):
    from sparse_nlp.pruning.schedules import CubicSchedule
    from sparse_nlp.training.pruner import GradualPruner

    model = moe_model("mixtral")
    model.train()
    movement = WeightSparsity(method="movement", sparsity=0.5)
    with pytest.raises(
        UnsupportedModelError, match=r"weights\[0\] selects the fused experts of mixtral: gradual"
    ):
        GradualPruner(model, SparsityConfig(weights=[movement]), CubicSchedule(start_step=0, end_step=10))
    with pytest.raises(sparse_nlp.ConfigError, match="scope 'global' is not available on mixture-of-experts"):
        GradualPruner(model, SparsityConfig.magnitude(0.5, scope="global"), CubicSchedule(end_step=10))
    rule = WeightSparsity(method="magnitude", sparsity=0.5, exclude=["experts"])
    only_linear = GradualPruner(
        model, SparsityConfig(weights=[rule]), CubicSchedule(start_step=0, end_step=10)
    )
    assert len(only_linear.plans) == 8 and not only_linear.expert_plans

    schedule = CubicSchedule(start_step=0, end_step=4, update_every=2)
    pruner = GradualPruner(model, SparsityConfig.magnitude(0.5), schedule)
    assert len(pruner.expert_plans) == 4  # gate_up_proj and down_proj of both layers
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    params = dict(model.named_parameters())
    batch = tiny_inputs(batch=4, length=10, pad=False)
    for step in range(1, 7):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.after_optimizer_step(step)
        target = schedule.sparsity_at(pruner.applied_step, 0.5)
        for plan in pruner.expert_plans:
            mask = pruner.masks()[plan.name]  # (E, out, in)
            assert torch.all(params[plan.name][~mask] == 0), (step, plan.name)
            for e in range(mask.shape[0]):  # every expert slice at the scheduled sparsity
                assert int((~mask[e]).sum()) == num_pruned(target, mask[e].numel()), (step, plan.name, e)
    assert pruner.applied_step == 4 and pruner.sparsity() == pytest.approx(0.5, abs=1e-3)
    pruner.save(tmp_path / "state")
    masks = pruner.masks()

    fresh = moe_model("mixtral")
    restored = GradualPruner(fresh, SparsityConfig.magnitude(0.5), schedule)
    restored.load(tmp_path / "state")
    again = restored.masks()
    assert again.keys() == masks.keys() and all(torch.equal(again[k], masks[k]) for k in masks)
    assert expert_masks(fresh).keys() == {p.name for p in restored.expert_plans}


def test_targets_json_with_a_wrong_type_is_named(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(
        json.dumps({"layers": 3, "o": "o", "ffn_in": ["up"], "ffn_out": "down", "attention": "a"})
    )
    with pytest.raises(TargetError, match="t.json: layers must be a str, got 3"):
        ModelTargets.load(path)
    path.write_text(
        json.dumps({"layers": "l", "o": "o", "ffn_in": "up", "ffn_out": "down", "attention": "a"})
    )
    with pytest.raises(TargetError, match="ffn_in must be a list of module paths"):
        ModelTargets.load(path)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_gemma_tied_head_is_refused_as_a_target(family):
    model = family_model(family)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # Gemma ties its head by default
    rule = WeightSparsity(method="magnitude", sparsity=0.5, targets=["re:lm_head"])
    with pytest.raises(TargetError, match="tied to the input embeddings"):
        sparse_nlp.sparsify(model, SparsityConfig(weights=[rule]), progress=False)
    assert list(masked_modules(model)) == []


def _mamba():
    config = transformers.MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=VOCAB)
    return transformers.MambaForCausalLM(config).eval()


def _vit():
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=8,
    )
    return transformers.ViTModel(config).eval()


@pytest.mark.parametrize("build", [_mamba, _vit], ids=["mamba", "vit"])
def test_report_counts_zeros_of_any_transformers_model(build):
    model = build()  # Mamba has no attention layout to infer; ViT is inferred
    name, linear = next((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        linear.weight[:, ::2] = 0
    result = sparse_nlp.report(model)
    row = next(r for r in result.rows if r.name == name)
    assert row.nonzeros == int(torch.count_nonzero(linear.weight)) and not row.masked
    assert row.sparsity >= 0.5
    assert result.groups["model"].numel == sum(p.numel() for p in model.parameters())
