"""Push to and pull from a Hub over real HTTP: tests/hub_server.py on 127.0.0.1, the real huggingface_hub client.

huggingface_hub reads HF_ENDPOINT when it is imported, and tests/conftest.py sets HF_HUB_OFFLINE=1 for the
test process, so every push and pull runs in a fresh subprocess with its own environment; the server runs
in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sparse_nlp import (
    AttentionSparsity,
    SparsityConfig,
    StructuredSparsity,
    WeightSparsity,
    save_pretrained,
    sparsify,
)

from .conftest import tiny_inputs, tiny_model
from .hub_server import HubServer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hub():
    server = HubServer().start()
    yield server
    server.stop()


def run_py(code: str, hub: HubServer, hf_home: Path, *, offline: bool = False, timeout: int = 180) -> dict:
    """Run `code` in a fresh Python with HF_ENDPOINT at the test server; returns the JSON it prints last."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HOME=str(hf_home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_OFFLINE="1" if offline else "0",
        HF_UPDATE_DOWNLOAD_COUNTS="0",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONPATH=str(ROOT),
        NO_PROXY="127.0.0.1,localhost",
    )
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _checkpoint(tmp_path: Path, name: str, compact: bool) -> tuple[Path, torch.Tensor]:
    """A tiny Llama with all three kinds of sparsity: 2:4 weights, a sliding-window pattern, removed heads/neurons."""
    model = tiny_model("llama")
    config = SparsityConfig(
        weights=[WeightSparsity(method="magnitude", sparsity=0.5, pattern="2:4")],
        attention=AttentionSparsity("sliding_window", {"window": 4, "causal": True}),
        structured=StructuredSparsity(heads=0.5, ffn=0.25, score="weight-norm", scope="per-layer"),
    )
    sparsify(model, config, progress=False)
    with torch.no_grad():
        logits = model(**tiny_inputs(length=20)).logits
    folder = save_pretrained(model, tmp_path / name, compact=compact)
    (folder / "params.txt").write_text(str(sum(p.numel() for p in model.parameters())))
    (folder / "results.json").write_text(
        json.dumps({"task": "wikitext2", "eval_perplexity": 123.4, "eval_runtime": 9.0})
    )
    (folder / "benchmark.json").write_text(json.dumps({"speedup": 1.7, "setting": "window 4, N=20, test"}))
    return folder, logits


PUSH = """
import json, sys
import sparse_nlp
from sparse_nlp.hub import push_to_hub
out = {{}}
for folder, repo in {pairs}:
    try:
        if folder.startswith("MODEL:"):  # push a model object (saved compact on the way)
            model = sparse_nlp.from_pretrained(folder.removeprefix("MODEL:"))
            r = push_to_hub(model, repo, base_model="org/tiny-dense", compact=True)
        else:
            r = push_to_hub(folder, repo, base_model="org/tiny-dense")
        out[repo] = {{"ok": True, "files": r.files, "commit": r.commit_oid}}
    except sparse_nlp.hub.HubError as err:
        out[repo] = {{"ok": False, "error": str(err)}}
print(json.dumps(out))
"""

PULL = """
import json, torch, sparse_nlp
from tests.conftest import tiny_inputs
out = {{}}
for repo, path in {pairs}:
    model = sparse_nlp.from_pretrained(repo)
    with torch.no_grad():
        torch.save(model(**tiny_inputs(length=20)).logits, path)
    out[repo] = {{
        "masked": len(model.config.sparse_nlp["masked_modules"]),
        "attn": model.config._attn_implementation,
        "params": sum(p.numel() for p in model.parameters()),
    }}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_push_pull_round_trip_bit_identical_then_offline(hub, tmp_path):
    dense, ref = _checkpoint(tmp_path, "dense", compact=False)
    compact, ref_c = _checkpoint(tmp_path, "compact", compact=True)
    assert torch.equal(ref, ref_c)
    params = int((dense / "params.txt").read_text())
    assert params < sum(p.numel() for p in tiny_model("llama").parameters())
    pushed = run_py(
        PUSH.format(
            pairs=[
                (str(dense), "org/tiny"),
                (str(compact), "org/tiny-compact"),
                (f"MODEL:{dense}", "org/tiny-object"),
            ]
        ),
        hub,
        tmp_path / "home-push",
    )
    assert all(v["ok"] for v in pushed.values()), pushed
    assert (
        "README.md" in pushed["org/tiny"]["files"] and "sparsity_config.json" in pushed["org/tiny"]["files"]
    )
    assert "sparse_nlp_compact.safetensors" in pushed["org/tiny-compact"]["files"]
    _check_card(hub.files("org/tiny")["README.md"].decode(), dense)
    assert "compact format" in hub.files("org/tiny-compact")["README.md"].decode()
    assert "sparse_nlp_compact.safetensors" in pushed["org/tiny-object"]["files"]

    home = tmp_path / "home-pull"  # a fresh cache: everything comes over HTTP
    repos = ("org/tiny", "org/tiny-compact", "org/tiny-object")
    outs = {repo: tmp_path / f"{repo.replace('/', '_')}.pt" for repo in repos}
    pulled = run_py(PULL.format(pairs=[(r, str(p)) for r, p in outs.items()]), hub, home)
    for repo, path in outs.items():
        assert torch.equal(torch.load(path), ref), repo
        assert pulled[repo]["masked"] == 14 and pulled[repo]["attn"] == "sparse_nlp"
        assert pulled[repo]["params"] == params  # the structured (shrunk) shapes came back
    resolves = [p for m, p in hub.requests if "/resolve/" in p and m == "GET"]
    assert any("sparse_nlp_compact.safetensors" in p for p in resolves)

    before = len(hub.requests)
    for path in outs.values():
        path.unlink()
    run_py(PULL.format(pairs=[(r, str(p)) for r, p in outs.items()]), hub, home, offline=True)
    assert len(hub.requests) == before  # served from the cache, no request at all
    for path in outs.values():
        assert torch.equal(torch.load(path), ref)


def _check_card(text: str, folder: Path) -> None:
    from huggingface_hub import ModelCard

    from sparse_nlp import from_pretrained, report

    card = ModelCard(text)
    assert card.data.base_model == "org/tiny-dense"
    assert {"sparse", "magnitude-pruning", "2-4-sparsity", "sliding-window-attention"} <= set(card.data.tags)
    results = card.data.eval_results
    assert [(r.dataset_name, r.metric_type, r.metric_value) for r in results] == [
        ("WikiText-2", "perplexity", 123.4)
    ]
    assert "- 1.70x (window 4, N=20, test)" in text
    measured = report(from_pretrained(folder))
    for group in ("attention", "ffn", "linear"):
        t = measured.groups[group]
        assert f"| {group} | {t.numel:,} | {t.nonzeros:,} | {t.sparsity:.2%} |" in text
    assert "14 of 15 Linear layers carry a mask" in text


@pytest.mark.slow
def test_failed_commit_raises_clearly_and_next_push_succeeds(hub, tmp_path):
    folder, _ = _checkpoint(tmp_path, "dense", compact=False)
    run_py(PUSH.format(pairs=[(str(folder), "org/flaky")]), hub, tmp_path / "home")
    commits = hub.commits("org/flaky")
    # a new evaluation result: this push has something to commit (an unchanged folder is skipped by the client)
    (folder / "results.json").write_text(json.dumps({"task": "wikitext2", "eval_perplexity": 99.5}))
    snapshot = {p.name: p.read_bytes() for p in folder.iterdir()}
    hub.fail_next("commit", 500)
    failed = run_py(PUSH.format(pairs=[(str(folder), "org/flaky")]), hub, tmp_path / "home")["org/flaky"]
    assert any(
        m == "POST" and "/commit/" in p for m, p in hub.requests[-3:]
    )  # the commit was tried and refused
    assert not failed["ok"]
    assert (
        "org/flaky" in failed["error"]
        and "HTTP 500" in failed["error"]
        and "Nothing was committed" in failed["error"]
    )
    assert hub.commits("org/flaky") == commits  # the server applied nothing
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == snapshot  # the local folder is unchanged
    again = run_py(PUSH.format(pairs=[(str(folder), "org/flaky")]), hub, tmp_path / "home")["org/flaky"]
    assert again["ok"] and hub.commits("org/flaky")[-1] == again["commit"]
    assert b"99.5" in hub.files("org/flaky")["README.md"]


def test_push_of_damaged_folder_uploads_nothing(tmp_path):
    from sparse_nlp import CheckpointError
    from sparse_nlp.hub import push_to_hub

    folder, _ = _checkpoint(tmp_path, "dense", compact=False)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    # checked before any request (this process is offline: a request would fail differently)
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: file has \d+ bytes but was saved with \d+"
    ):
        push_to_hub(folder, "org/broken")


@pytest.mark.slow
def test_push_pull_through_lfs_uploads(tmp_path):
    """As on the real Hub: *.safetensors answered "lfs", uploaded by the LFS batch API + PUT (Xet off)."""
    server = HubServer(lfs=(".safetensors",)).start()
    try:
        compact, ref = _checkpoint(tmp_path, "compact", compact=True)
        pushed = run_py(PUSH.format(pairs=[(str(compact), "org/lfs")]), server, tmp_path / "home-push")
        assert pushed["org/lfs"]["ok"], pushed
        assert any(p.endswith("/info/lfs/objects/batch") for _, p in server.requests)
        assert sum(m == "PUT" for m, _ in server.requests) == 1  # the one weight file; the rest is regular
        assert (
            server.files("org/lfs")["sparse_nlp_compact.safetensors"]
            == (compact / "sparse_nlp_compact.safetensors").read_bytes()
        )
        out = tmp_path / "lfs.pt"
        run_py(PULL.format(pairs=[("org/lfs", str(out))]), server, tmp_path / "home-pull")
        assert torch.equal(torch.load(out), ref)
    finally:
        server.stop()
