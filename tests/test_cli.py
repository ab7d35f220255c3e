"""The sparse-nlp command: sparsify and report on tiny models, --help, and errors that write nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sparse_nlp.cli import main
from sparse_nlp.pruning.masking import masked_modules
from tests.conftest import tiny_model


@pytest.fixture
def tiny_dir(tmp_path):
    path = tmp_path / "tiny-bert"
    tiny_model("bert").save_pretrained(path)
    return path


def test_sparsify_then_report(tiny_dir, tmp_path, capsys):
    out = tmp_path / "sparse"
    code = main(
        [
            "sparsify",
            str(tiny_dir),
            "--method",
            "magnitude",
            "--sparsity",
            "0.5",
            "--targets",
            "ffn",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "50.00%" in printed and str(out) in printed
    assert (out / "config.json").is_file()

    assert main(["report", str(out), "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["groups"]["ffn"]["sparsity"] == pytest.approx(0.5)
    assert data["groups"]["attention"]["sparsity"] == pytest.approx(0.0)

    import sparse_nlp

    loaded = sparse_nlp.from_pretrained(out)
    assert len(list(masked_modules(loaded))) == 4


def test_report_writes_json_file(tiny_dir, tmp_path, capsys):
    target = tmp_path / "report.json"
    assert main(["report", str(tiny_dir), "--json", str(target)]) == 0
    assert "group" in capsys.readouterr().out
    assert json.loads(target.read_text())["groups"]["linear"]["sparsity"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sparsity", "1.2"], r"weights\[0\].sparsity must be in \[0, 1\)"),
        (["--method", "magnitud"], "Did you mean 'magnitude'"),
        (["--targets", "fnn"], "Did you mean 'ffn'"),
        (["--pattern", "block:0x4"], "Accepted forms"),
        (["--targets", "re:nothing_here"], "matches no Linear layer"),
    ],
)
def test_bad_arguments_fail_clearly_and_write_nothing(tiny_dir, tmp_path, capsys, args, message):
    out = tmp_path / "never"
    code = main(["sparsify", str(tiny_dir), "--out", str(out), "--no-progress", *args])
    assert code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert __import__("re").search(message, err), err
    assert not out.exists()


def test_missing_model_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path / "no" / "such" / "model")]) == 2
    assert "does not exist" in capsys.readouterr().err


HELP_COMMANDS = [[], ["sparsify"], ["report"]]

# `python -m sparse_nlp.cli CMD --help` for every command, in one fresh interpreter (one start-up, not three)
_HELP_RUNNER = """
import contextlib, io, json, runpy, sys
for command in json.loads(sys.argv[1]):
    sys.argv = ["sparse-nlp", *command, "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_module("sparse_nlp.cli", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exit:
            code = exit.code or 0
    print(json.dumps({"command": command, "code": code, "stdout": out.getvalue()}))
"""


@pytest.fixture(scope="module")
def help_runs() -> dict[str, tuple[int, str]]:
    result = subprocess.run(
        [sys.executable, "-c", _HELP_RUNNER, json.dumps(HELP_COMMANDS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    runs = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {" ".join(r["command"]): (r["code"], r["stdout"]) for r in runs}


@pytest.mark.parametrize("command", HELP_COMMANDS)
def test_help(command, help_runs):
    returncode, stdout = help_runs[" ".join(command)]
    assert returncode == 0
    assert "usage: sparse-nlp" in stdout
    if command == ["sparsify"]:
        assert "--sparsity" in stdout and "minilm" in stdout


@pytest.mark.real
def test_minilm_alias(tmp_path, capsys, minilm_path):
    out = tmp_path / "mini"
    assert (
        main(
            [
                "sparsify",
                "minilm",
                "--sparsity",
                "0.5",
                "--targets",
                "ffn",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()
    capsys.readouterr()
    assert main(["report", str(out), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["groups"]["ffn"]["sparsity"] == pytest.approx(0.5)
