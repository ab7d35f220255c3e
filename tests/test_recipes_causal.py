"""Causal-LM recipes: a tiny llama fine-tuned on a text corpus, pruned gradually with distillation from its dense
teacher, pruned one-shot (Wanda 2:4) and recovered with the masks kept exact, structured removal on a decoder,
perplexity with its protocol; bad recipes fail before training with the field named."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from sparse_nlp import from_pretrained
from sparse_nlp.cli import main
from sparse_nlp.config import ConfigError
from sparse_nlp.errors import UnsupportedModelError
from sparse_nlp.pruning.masking import masked_modules
from sparse_nlp.recipes import FSDP_ENV, Recipe, load_recipe, run_recipe
from sparse_nlp.training.distillation import (
    DistillationConfig,
    Distiller,
    logits_kd_loss,
    task_loss,
)

from .conftest import tiny_config
from .tiny_glue import tiny_bert_folder

WORDS = ["<eos>", "<unk>"] + [f"w{i}" for i in range(62)]


def tiny_llama_folder(path: Path, seed: int = 0) -> Path:
    """A 2-layer random llama (conftest's TINY_DECODER sizes) with a word-level tokenizer, saved to `path`."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>"
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(tiny_config("llama", vocab_size=len(WORDS)))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def corpus_lines(n: int, seed: int) -> list[str]:
    """Lines of a learnable language: each line counts up from a random word (w5 w6 w7 ...)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        start = rng.randrange(2, 50)
        lines.append(" ".join(f"w{start + k}" for k in range(rng.randint(6, 12))))
    return lines


def tiny_text_dir(root: Path) -> Path:
    """A data directory with WikiText-2-shaped raw files (valid for training, test for perplexity)."""
    folder = root / "wikitext-2-raw"
    folder.mkdir(parents=True)
    for split, seed in (("valid", 0), ("test", 1)):
        lines = [f" {line} " for line in corpus_lines(150 if split == "valid" else 40, seed)]
        (folder / f"wiki.{split}.raw").write_text("\n".join(lines) + "\n")
    return root


TEXT = """
model: {model}
task: wikitext2
max_length: 32
stages:
  - name: eval-start
    type: evaluate
    perplexity: {{context: 64, max_windows: 4}}
  - name: dense
    type: finetune
    training: {{max_steps: 30, learning_rate: 3e-3, batch_size: 8, warmup: 0, logging_steps: 100}}
  - name: gmp
    type: prune
    teacher: dense
    sparsity: {{weights: [{{method: magnitude, sparsity: 0.5, targets: [all-linear]}}]}}
    schedule: {{start_step: 0, end_step: 6, update_every: 2}}
    distillation: {{temperature: 2.0, alpha: 0.5}}
    training: {{max_steps: 10, learning_rate: 1e-3, batch_size: 8, logging_steps: 100}}
  - name: eval
    type: evaluate
    perplexity: {{context: 64, max_windows: 4}}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def _linear_weights(model) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if ".layers." in n and n.endswith("weight") and p.dim() == 2
    }


def test_causal_recipe_finetunes_prunes_with_distillation_and_reports_perplexity(tmp_path):
    model_dir = tiny_llama_folder(tmp_path / "model")
    data_dir = tiny_text_dir(tmp_path / "data")
    recipe = _write(tmp_path, TEXT.format(model=model_dir))
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--data-dir", str(data_dir), "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    start, dense, gmp, final = results["stages"]
    assert results["train_text"] == "wikitext2 valid"
    for record in (start, final):  # the protocol is recorded beside the number
        assert record["task"] == "wikitext2" and record["split"] == "test"
        assert record["data_file"] == "wikitext-2-raw/wiki.test.raw"
        assert (record["context"], record["stride"], record["windows"]) == (64, 64, 4)
        assert record["scored_tokens"] == 63 * 4 and record["main_metric"] == "perplexity"
        assert math.isfinite(record["perplexity"])
    # the corpus counts upwards: 30 steps of fine-tuning learn much of it
    assert final["perplexity"] < 0.5 * start["perplexity"], (start["perplexity"], final["perplexity"])
    assert dense["steps"] == 30 and gmp["steps"] == 10
    assert gmp["sparsity"] == pytest.approx(0.5, abs=1e-3) and final["block_sparsity"] == pytest.approx(
        0.5, abs=1e-3
    )
    # masks exact in the checkpoint: every masked weight is zero, the kept weights trained after the last update
    pruned = from_pretrained(out / "gmp")
    masks = dict(masked_modules(pruned))
    assert len(masks) == 14  # q, k, v, o, gate, up, down in 2 blocks
    for name, module in masks.items():
        mask = module.weight_mask
        assert torch.all(module.weight[~mask] == 0), name
        assert (~mask).float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert (out / "gmp" / "recipe.yaml").is_file()


ONESHOT = """
model: {model}
task: {task}
max_length: 32
stages:
  - name: dense
    type: finetune
    training: {{max_steps: 30, learning_rate: 3e-3, batch_size: 8, warmup: 0, logging_steps: 100}}
  - name: wanda24
    type: oneshot
    sparsity: {{weights: [{{method: wanda, sparsity: 0.5, pattern: "2:4", targets: [all-linear]}}]}}
    calibration: {{num_samples: 8, seq_len: 32}}
  - name: eval-oneshot
    type: evaluate
    perplexity: {{context: 64, max_windows: 3}}
  - name: recover
    type: prune
    teacher: dense
    distillation: {{temperature: 1.0, alpha: 1.0, teacher_dtype: bfloat16}}
    training: {{max_steps: 12, learning_rate: 2e-3, batch_size: 8, warmup: 0, logging_steps: 100}}
  - name: eval
    type: evaluate
    perplexity: {{context: 64, max_windows: 3}}
"""


def test_oneshot_stage_then_recovery_keeps_the_masks_exact(tmp_path, monkeypatch):
    """A fine-tuned tiny llama pruned by Wanda 2:4 inside a recipe, then a prune stage without sparsity (a
    recovery) distilled from the dense model in bf16: the zeros are exactly the one-shot ones, every group of 4
    keeps 2, the kept weights train and the perplexity falls back towards the dense one."""
    model_dir = tiny_llama_folder(tmp_path / "model")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines(200, 3)) + "\n")
    teachers = []
    original_init = Distiller.__init__

    def spy(self, student, teacher, config):
        original_init(self, student, teacher, config)
        teachers.append(self.teacher)

    monkeypatch.setattr(Distiller, "__init__", spy)
    recipe = load_recipe(_write(tmp_path, ONESHOT.format(model=model_dir, task=corpus)))
    results = run_recipe(recipe, tmp_path / "out", progress=False)
    dense_record, oneshot, eval_oneshot, recover, final = results["stages"]
    assert oneshot["calibration"] == {
        "source": str(corpus),
        "num_samples": 8,
        "seq_len": 32,
        "cut": "random",
        "seed": 0,
    }
    assert oneshot["block_sparsity"] == pytest.approx(0.5) and recover["masks"] == "kept"
    assert eval_oneshot["data_file"] == "corpus.txt" and eval_oneshot["split"] == "file"
    assert recover["steps"] == 12 and final["block_sparsity"] == pytest.approx(0.5)
    (teacher,) = teachers  # the fine-tuned dense model, in bf16
    assert next(teacher.parameters()).dtype == torch.bfloat16
    dense = _linear_weights(from_pretrained(tmp_path / "out" / "dense"))
    assert all(torch.equal(p, dense[n].to(torch.bfloat16)) for n, p in _linear_weights(teacher).items())
    before = _linear_weights(from_pretrained(tmp_path / "out" / "wanda24"))
    after = _linear_weights(from_pretrained(tmp_path / "out" / "recover"))
    changed = 0
    for name, p in before.items():
        q = after[name]
        assert torch.equal(p == 0, q == 0), name  # the same zeros, exactly
        groups = (q != 0).reshape(q.shape[0], -1, 4).sum(-1)
        assert torch.all(groups <= 2), name  # 2:4 holds
        changed += int(not torch.equal(p, q))
    assert changed == len(before)  # and every kept weight set trained
    assert final["perplexity"] < eval_oneshot["perplexity"], (eval_oneshot["perplexity"], final["perplexity"])


STRUCTURED = """
model: {model}
task: {task}
max_length: 32
stages:
  - name: shrink
    type: structured
    structured: {{heads: 0.5, ffn: 0.5, score: taylor}}
    removal: {{stages: 2, steps_per_stage: 2, score_batches: 2}}
    teacher: start
    distillation: {{temperature: 2.0, alpha: 0.5}}
    training: {{max_steps: 6, learning_rate: 1e-3, batch_size: 4, logging_steps: 100}}
  - name: eval
    type: evaluate
    perplexity: {{context: 32, max_windows: 2}}
"""


def test_structured_stage_on_a_decoder(tmp_path):
    """Structured removal (heads and FFN neurons, Taylor scores from the text windows) runs in a text recipe."""
    model_dir = tiny_llama_folder(tmp_path / "model")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines(100, 4)) + "\n")
    recipe = load_recipe(_write(tmp_path, STRUCTURED.format(model=model_dir, task=corpus)))
    results = run_recipe(recipe, tmp_path / "out", progress=False)
    shrink, final = results["stages"]
    assert shrink["steps"] == 6 and math.isfinite(final["perplexity"])
    shrunk = from_pretrained(tmp_path / "out" / "shrink")
    ffn = [layer.mlp.down_proj.weight.shape[1] for layer in shrunk.model.layers]
    assert sum(ffn) == 64  # half of the 2 x 64 FFN neurons (spread over the layers by score)
    assert sum(p.numel() for p in shrunk.parameters()) < sum(
        p.numel() for p in from_pretrained(model_dir).parameters()
    )


def _recipe(task: str = "wikitext2", **stage) -> dict:
    base = {"name": "s", "type": "evaluate"}
    return {"model": "m", "task": task, "stages": [{**base, **stage}]}


@pytest.mark.parametrize(
    "data, message",
    [
        (
            _recipe(task="wikitext3"),
            r"task must be a GLUE task .*text corpus \(wikitext2.*\.txt file.*Did you mean 'wikitext2'",
        ),
        (_recipe(split="dev"), r"stages\[0\]\.split of text task 'wikitext2' must be one of test, valid"),
        (_recipe(task="notes.txt", split="test"), r"stages\[0\]\.split .*left out"),
        (
            _recipe(task="tinyshakespeare", split="test"),
            r"stages\[0\]\.split .*must be one of train, got 'test'",
        ),
        (_recipe(task="sst2", perplexity={"context": 64}), r"stages\[0\]\.perplexity is for text tasks"),
        (_recipe(perplexity={"context": 1}), r"stages\[0\]\.perplexity\.context must be >= 2"),
        (_recipe(perplexity={"contxt": 64}), r"stages\[0\]\.perplexity\.contxt.*Did you mean 'context'"),
        (_recipe(type="oneshot"), r"stages\[0\]\.sparsity is required for a oneshot stage"),
        (
            _recipe(type="oneshot", sparsity={"weights": [{}]}, training={}),
            r"stages\[0\]\.training has no meaning in a oneshot stage",
        ),
        (
            _recipe(type="oneshot", sparsity={"weights": [{}]}, calibration={"cut": "lines2"}),
            r"stages\[0\]\.calibration\.cut must be one of random, even, lines",
        ),
        (
            _recipe(type="oneshot", sparsity={"weights": [{}]}, calibration={"num_samples": 0}),
            r"stages\[0\]\.calibration\.num_samples must be >= 1",
        ),
        (_recipe(calibration={}), r"stages\[0\]\.calibration has no meaning in a evaluate stage"),
        (
            _recipe(type="prune", training={}, distillation={"teacher_dtype": "int8"}),
            r"teacher_dtype must be one of float32, bfloat16",
        ),
        (
            _recipe(type="prune", training={}, schedule={"end_step": 4}),
            r"stages\[0\]\.sparsity is required for a prune stage",
        ),
        (_recipe(name="start"), r"stages\[0\]\.name 'start' is reserved"),
    ],
)
def test_bad_causal_recipes_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        Recipe.from_dict(data)


def test_recovery_without_masks_fails_before_training(tmp_path):
    model_dir = tiny_llama_folder(tmp_path / "model")
    data_dir = tiny_text_dir(tmp_path / "data")
    recipe = Recipe.from_dict(
        {
            "model": str(model_dir),
            "task": "wikitext2",
            "max_length": 32,
            "stages": [{"name": "recover", "type": "prune", "training": {"max_steps": 2}}],
        }
    )
    with pytest.raises(ConfigError, match=r"stage 'recover' is a prune stage without sparsity.*no masks"):
        run_recipe(recipe, tmp_path / "out", data_dir=data_dir, progress=False)


def test_text_task_needs_a_decoder_and_a_long_enough_text(tmp_path, capsys):
    encoder = tiny_bert_folder(tmp_path / "bert")
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3\n")
    recipe = _write(tmp_path, TEXT.format(model=encoder))
    data_dir = tiny_text_dir(tmp_path / "data")
    with pytest.raises(UnsupportedModelError, match=r"text corpus for causal decoders.*bert encoder"):
        run_recipe(load_recipe(recipe), tmp_path / "out", data_dir=data_dir, progress=False)
    llama = tiny_llama_folder(tmp_path / "llama")
    text = TEXT.format(model=llama).replace("task: wikitext2", f"task: {short}")
    text = text.replace("    perplexity: {context: 64, max_windows: 4}\n", "")
    argv = ["run", str(_write(tmp_path, text)), "--out", str(tmp_path / "out2"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "short.txt has 3 tokens, fewer than one training window of max_length 32" in err


def test_pruning_recipes_refuse_fsdp(tmp_path, monkeypatch):
    """Masks live on whole parameters: under accelerate's FSDP plugin a recipe that prunes stops at once."""
    monkeypatch.setenv(FSDP_ENV, "true")
    recipe = load_recipe(_write(tmp_path, TEXT.format(model=tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match=r"stages \['gmp'\] prune.*FSDP.*--multi_gpu"):
        run_recipe(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_causal_task_loss_and_token_distillation():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config("llama", vocab_size=len(WORDS))).eval()
    ids = torch.randint(2, len(WORDS), (2, 10))
    labels = ids.clone()
    labels[1, 6:] = -100  # padding
    out = model(input_ids=ids, labels=labels)
    assert task_loss(out.logits, labels).item() == pytest.approx(out.loss.item(), rel=1e-5)
    # the same model as teacher: no distillation loss; another one: a positive per-token KL
    assert logits_kd_loss(out.logits, out.logits, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn_like(out.logits)
    keep = torch.zeros(2, 10, dtype=torch.bool)
    keep[0, 3] = True
    one = logits_kd_loss(out.logits, other, 1.0, keep)  # one position: the KL of that token alone
    expected = torch.nn.functional.kl_div(
        out.logits[0, 3].log_softmax(-1), other[0, 3].log_softmax(-1), log_target=True, reduction="sum"
    )
    assert one.item() == pytest.approx(expected.item(), rel=1e-5)
    # the Distiller: alpha 0 gives the task loss, scaled by predicted tokens / num_items_in_batch
    distiller = Distiller(model, transformers.LlamaForCausalLM(model.config), DistillationConfig(alpha=0.0))
    student = model(input_ids=ids)
    items = int((labels[:, 1:] != -100).sum())
    loss = distiller(student, labels, num_items_in_batch=2 * items)
    assert loss.item() == pytest.approx(out.loss.item() / 2, rel=1e-5)
    distiller.remove()
