"""The CLI side of compact checkpoints and cards: sparsify --compact, compact, push --card-out, one-line errors."""

from __future__ import annotations

import torch

from sparse_nlp import SparsityConfig, WeightSparsity, from_pretrained, save_pretrained, sparsify
from sparse_nlp.cli import main
from sparse_nlp.compact import COMPACT_FILE

from .conftest import tiny_inputs, tiny_model


def _dense_checkpoint(tmp_path):
    model = tiny_model("bert")
    sparsify(
        model, SparsityConfig(weights=[WeightSparsity(method="magnitude", sparsity=0.9)]), progress=False
    )
    return model, save_pretrained(model, tmp_path / "dense")


def test_compact_command_writes_an_exact_smaller_copy(tmp_path, capsys):
    model, dense = _dense_checkpoint(tmp_path)
    before = {p.name: p.read_bytes() for p in dense.iterdir()}
    assert main(["compact", str(dense), "--out", str(tmp_path / "small")]) == 0
    assert "ratio" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in dense.iterdir()} == before  # the source is untouched
    assert (tmp_path / "small" / COMPACT_FILE).is_file() and not (
        tmp_path / "small" / "model.safetensors"
    ).exists()
    loaded = from_pretrained(tmp_path / "small")
    inputs = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    # compacting a compact checkpoint is refused, in one line
    capsys.readouterr()
    assert main(["compact", str(tmp_path / "small"), "--out", str(tmp_path / "again")]) == 2
    assert "compact already" in capsys.readouterr().err


def test_compact_command_names_a_damaged_file(tmp_path, capsys):
    _, dense = _dense_checkpoint(tmp_path)
    data = (dense / "model.safetensors").read_bytes()
    (dense / "model.safetensors").write_bytes(data[:1000])
    capsys.readouterr()
    assert main(["compact", str(dense), "--out", str(tmp_path / "small")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.safetensors" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "small").exists()


def test_sparsify_command_compact_flag(tmp_path, capsys):
    tiny_model("bert").save_pretrained(tmp_path / "base")
    out = tmp_path / "sparse"
    assert (
        main(
            [
                "sparsify",
                str(tmp_path / "base"),
                "--sparsity",
                "0.9",
                "--out",
                str(out),
                "--compact",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (out / COMPACT_FILE).is_file() and not (out / "model.safetensors").exists()
    loaded = from_pretrained(out)
    assert loaded.config.sparse_nlp["masked_modules"]


def test_push_card_dry_run_writes_card_and_uploads_nothing(tmp_path, capsys):
    _, dense = _dense_checkpoint(tmp_path)
    card = tmp_path / "card.md"
    # this process is offline (conftest): any upload attempt would fail, so success means nothing was sent
    assert main(["push", str(dense), "org/tiny", "--card-out", str(card), "--base-model", "org/base"]) == 0
    text = card.read_text()
    assert "base_model: org/base" in text and "| linear |" in text and "magnitude-pruning" in text
    assert "nothing was uploaded" in capsys.readouterr().out
