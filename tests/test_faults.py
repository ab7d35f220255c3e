"""Faults a demanding user or a reviewer would try: concurrent and killed saves, damaged files, pushes,
resumes, recipe stage names, code shipped in a checkpoint, untrained heads and bad inputs.

Every test uses tiny random models and runs in seconds. The counts the tests reach (loads, mixed loads,
kills, corruptions, caught) are printed by ``python -m pytest tests/test_faults.py -s`` as ``FAULTS ...`` lines.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparse_nlp import SparsityConfig, WeightSparsity, save_pretrained, sparsify
from sparse_nlp.checkpoint import recover
from sparse_nlp.cli import main

from .conftest import VOCAB, tiny_model


def _tokenizer(swap: bool = False):
    """A word-level tokenizer over w2..w127; `swap` exchanges the ids of w2 and w3 (same size on disk)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    if swap:
        vocab["w2"], vocab["w3"] = 3, 2
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def _sparse(sparsity: float = 0.5, seed: int = 0):
    model = tiny_model("bert", seed=seed)
    sparsify(
        model,
        SparsityConfig(weights=[WeightSparsity(method="magnitude", sparsity=sparsity)]),
        progress=False,
    )
    return model


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    assert "Traceback" not in "\n".join(err)
    return err[-1]


# ---- 3. push uploads exactly the checkpoint ------------------------------------------------------------


def _stage_folder(tmp_path: Path) -> Path:
    """A `sparse-nlp run` stage folder: the checkpoint plus Trainer leftovers, pickles and evaluation JSONs."""
    folder = tmp_path / "stage"
    save_pretrained(_sparse(), folder, tokenizer=_tokenizer())
    trainer = folder / "trainer" / "checkpoint-4"
    trainer.mkdir(parents=True)
    for name in ("optimizer.pt", "rng_state.pth", "scheduler.pt", "training_args.bin", "model.safetensors"):
        (trainer / name).write_bytes(b"\x80\x04pickle")
    (folder / "eval_sst2.json").write_text(json.dumps({"task": "sst2", "accuracy": 81.0}))
    (folder / "notes.txt").write_text("local notes")
    return folder


def test_push_files_are_exactly_the_manifest(tmp_path):
    from sparse_nlp.hub import HubError, push_files

    folder = _stage_folder(tmp_path)
    manifest = json.loads((folder / "config.json").read_text())["sparse_nlp"]["files"]
    files = push_files(folder)
    assert sorted(files) == sorted(["config.json", *manifest])
    assert "tokenizer.json" in files and "sparse_masks.safetensors" in files
    assert not any(f.startswith("trainer/") or f.endswith((".pt", ".pth", ".bin")) for f in files)
    assert push_files(folder, include=["notes.txt"]) == sorted([*files, "notes.txt"])
    assert push_files(folder, include=["*.txt", "*.json"], exclude=["eval_*"]) == sorted(
        {*files, "notes.txt"}
    )
    with pytest.raises(HubError, match=r"pickle.*optimizer\.pt"):
        push_files(folder, include=["trainer/checkpoint-4/*"])
    with pytest.raises(HubError, match="matches no file"):
        push_files(folder, include=["nothing-*"])
    with pytest.raises(HubError, match=r"would remove 'model\.safetensors'"):
        push_files(folder, exclude=["model.*"])


def test_push_to_local_hub_uploads_exactly_the_manifest_and_the_card(tmp_path, monkeypatch):
    """Over real HTTP to tests/hub_server.py: the repository holds the manifest's files + README.md only."""
    from huggingface_hub import constants

    from sparse_nlp.hub import push_to_hub

    from .hub_server import HubServer

    folder = _stage_folder(tmp_path)
    expected = set(json.loads((folder / "config.json").read_text())["sparse_nlp"]["files"])
    server = HubServer().start()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        result = push_to_hub(folder, "org/stage", token="test")
        remote = server.files("org/stage")
        remote.pop(".gitattributes")  # written by the Hub when it creates a repository
    finally:
        server.stop()
    assert set(remote) == expected | {"config.json", "README.md"}
    assert set(result.files) == set(remote)
    card = remote["README.md"].decode()
    for name in expected | {"config.json"}:
        assert f"| `{name}` | {(folder / name).stat().st_size:,} |" in card
    assert "81.0" in card  # the evaluation JSON feeds the card, it is not uploaded itself


# ---- 4. resume from the newest complete Trainer checkpoint ----------------------------------------------


def _trainer_checkpoint(root: Path, step: int, *, state=True, pruning=True, weights=True) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if weights:
        (folder / "model.safetensors").write_bytes(b"x")
    if state is True:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    elif state == "torn":
        (folder / "trainer_state.json").write_text('{"global_st')
    if pruning:
        (folder / "sparse_pruner.json").write_text(json.dumps({"applied_step": step}))
    return folder


def test_resume_skips_incomplete_checkpoints_and_says_why(tmp_path):
    from sparse_nlp.training.resume import newest_complete

    root = tmp_path / "trainer"
    _trainer_checkpoint(root, 2)
    _trainer_checkpoint(root, 4, pruning=False)  # killed between the Trainer's save and the pruner's
    _trainer_checkpoint(root, 6, state="torn")  # killed while trainer_state.json was written
    _trainer_checkpoint(root, 8, state=False)  # killed before trainer_state.json
    _trainer_checkpoint(root, 10, weights=False)
    chosen, skipped = newest_complete(root, pruning=True)
    assert chosen == root / "checkpoint-2"
    reasons = {p.name: why for p, why in skipped}
    assert list(reasons) == ["checkpoint-10", "checkpoint-8", "checkpoint-6", "checkpoint-4"]
    assert "no model weights" in reasons["checkpoint-10"]
    assert "no trainer_state.json" in reasons["checkpoint-8"]
    assert "unreadable" in reasons["checkpoint-6"]
    assert "pruning state" in reasons["checkpoint-4"]
    # a finetune stage has no pruning state to wait for
    assert newest_complete(root, pruning=False)[0] == root / "checkpoint-4"
    assert newest_complete(tmp_path / "none", pruning=True) == (None, [])


# ---- 5. recipe stage names -----------------------------------------------------------------------------

_RECIPE = """model: minilm
task: sst2
stages:
  - name: {name}
    type: finetune
    training: {{max_steps: 1}}
"""


@pytest.mark.parametrize("name", ["'..'", "'.'", "'.hidden'", "a/b", "'..\\\\x'", "'-x'", "''"])
def test_unsafe_stage_names_are_refused(tmp_path, capsys, name):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_RECIPE.format(name=name))
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--out", str(out)]) == 2
    assert "stages[0].name must be a plain folder name" in _error_line(capsys)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_safe_stage_names_pass(tmp_path):
    from sparse_nlp.recipes import load_recipe

    for name in ("dense", "gmp-90", "stage_2.v1"):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(_RECIPE.format(name=name))
        assert load_recipe(recipe).stages[0].name == name


def test_binary_recipe_is_one_error_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"model: minilm\n\xff\xfe\x00binary")
    assert main(["run", str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert "not a text recipe" in _error_line(capsys)


# ---- 6. no code from a checkpoint ------------------------------------------------------------------------


def _remote_code_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "custom"
    tiny_model("bert").save_pretrained(folder)
    marker = tmp_path / "IMPORTED"
    raw = json.loads((folder / "config.json").read_text())
    raw.update(
        model_type="evil-model",
        auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"},
        architectures=["EvilModel"],
    )
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import BertConfig as EvilConfig, BertModel as EvilModel\n"
    )
    return folder, marker


@pytest.mark.parametrize("command", ["report", "sparsify", "evaluate"])
def test_remote_code_is_never_prompted_nor_run(tmp_path, capsys, monkeypatch, command):
    folder, marker = _remote_code_checkpoint(tmp_path)
    data = tmp_path / "data" / "glue" / "sst2"
    data.mkdir(parents=True)
    (data / "dev.tsv").write_text("sentence\tlabel\nw2 w3\t1\nw4\t0\n")
    prompts = []
    monkeypatch.setattr("builtins.input", lambda *a: prompts.append(a) or "y")  # a user who says yes
    argv = {
        "report": ["report", str(folder)],
        "sparsify": ["sparsify", str(folder), "--out", str(tmp_path / "o"), "--sparsity", "0.5"],
        "evaluate": ["evaluate", str(folder), "--task", "sst2", "--allow-untrained-head"]
        + ["--data-dir", str(tmp_path / "data")],
    }[command]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert "needs its own Python code" in line and "--trust-remote-code" in line
    assert prompts == [] and not marker.exists()


def test_remote_code_refused_by_the_library_too(tmp_path):
    from sparse_nlp import CheckpointError, from_pretrained
    from sparse_nlp.models import load_model

    folder, marker = _remote_code_checkpoint(tmp_path)
    for load in (from_pretrained, load_model):
        with pytest.raises(CheckpointError, match="trust_remote_code=True"):
            load(folder)
    assert not marker.exists()


# ---- 7. evaluate and untrained heads; inputs checked first -----------------------------------------------


def test_evaluate_refuses_a_model_without_a_trained_head(tmp_path, capsys, data_dir, monkeypatch):
    import sparse_nlp.evaluation.tasks as tasks

    base = tmp_path / "base"
    tiny_model("bert", head="base").save_pretrained(base)
    _tokenizer().save_pretrained(base)
    loads = []
    real = tasks.load_for_task
    monkeypatch.setattr(tasks, "load_for_task", lambda *a, **k: loads.append(a) or real(*a, **k))
    argv = ["evaluate", str(base), "--task", "sst2", "--data-dir", str(data_dir), "--limit", "4"]
    assert main(argv) == 2
    assert "no trained sequence-classification head" in _error_line(capsys) and loads == []
    assert main([*argv, "--allow-untrained-head", "--max-length", "16"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["untrained_head"] is True
    assert not list(base.glob("eval_*.json"))  # nothing push would publish

    from sparse_nlp.hub import eval_results

    assert eval_results(printed) == []


def test_evaluate_checks_the_data_before_loading_the_model(tmp_path, capsys, monkeypatch):
    import sparse_nlp.evaluation.tasks as tasks

    folder = tmp_path / "m"
    tiny_model("bert").save_pretrained(folder)
    monkeypatch.setattr(tasks, "load_for_task", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["evaluate", str(folder), "--task", "sst2", "--data-dir", str(tmp_path / "nodata")]
    assert main(argv) == 2
    assert "data directory" in _error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", str(folder), "--task", "sst2", "--data-dir", str(tmp_path / "empty")]) == 2
    assert "glue/sst2/dev.tsv" in _error_line(capsys)


# ---- 8. smaller points -----------------------------------------------------------------------------------


def test_calibration_offline_without_data_is_an_immediate_clear_error(tmp_path, capsys, monkeypatch):
    import time

    folder = tmp_path / "m"
    tiny_model("bert").save_pretrained(folder)
    monkeypatch.delenv("SPARSE_NLP_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.perf_counter()
    argv = ["sparsify", str(folder), "--out", str(tmp_path / "o"), "--method", "wanda"]
    assert main([*argv, "--sparsity", "0.5", "--calibration", "sst2"]) == 2
    line = _error_line(capsys)
    assert time.perf_counter() - start < 10
    assert "the Hub cannot be used" in line and "DIR/glue/sst2/train.tsv" in line and "--data-dir" in line


def test_report_works_on_a_model_outside_the_targets_table(tmp_path, capsys):
    import transformers

    from sparse_nlp.report import report

    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0
    )
    model = transformers.T5Model(config)
    with torch.no_grad():
        model.encoder.block[0].layer[1].DenseReluDense.wi.weight[:8] = 0
    result = report(model)
    assert result.groups["linear"].nonzeros < result.groups["linear"].numel
    folder = tmp_path / "t5"
    model.save_pretrained(folder)
    assert main(["report", str(folder), "--json", "-"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["groups"]["linear"]["nonzeros"] == result.groups["linear"].nonzeros


# ---- 1. atomic saves: concurrent readers and writers, kills at every step --------------------------------

COUNTS: dict[str, int] = {}


def _count(key: str, n: int = 1) -> None:
    COUNTS[key] = COUNTS.get(key, 0) + n


@pytest.fixture(scope="module", autouse=True)
def _print_counts():
    yield
    if COUNTS:
        import os

        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        print("\nFAULTS " + " ".join(f"{k}={v}" for k, v in sorted(COUNTS.items())), end="")
        print(f" torch_threads={torch.get_num_threads()} loadavg={load}")


def _signature(model, tokenizer=None) -> str:
    """A digest of everything a load gives back: weights, masks, recorded sparsity, tokenizer vocabulary."""
    import hashlib

    from sparse_nlp.metadata import read_metadata
    from sparse_nlp.pruning.masking import masked_modules

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode() + tensor.detach().contiguous().numpy().tobytes())
    for name, module in masked_modules(model):
        h.update(name.encode() + module._buffers["weight_mask"].numpy().tobytes())
    h.update(read_metadata(model.config).to_json().encode())
    if tokenizer is not None:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def two_saves(tmp_path_factory):
    """Models A (50%, seed 0) and B (90%, seed 1, other tokenizer) with the signatures of their loads."""
    from sparse_nlp.models import load_model

    root = tmp_path_factory.mktemp("two")
    models = {"A": (_sparse(0.5, 0), _tokenizer()), "B": (_sparse(0.9, 1), _tokenizer(swap=True))}
    sigs = {}
    for key, (model, tok) in models.items():
        save_pretrained(model, root / key, tokenizer=tok)
        sigs[key] = _signature(*load_model(root / key))
    assert sigs["A"] != sigs["B"]
    return models, sigs


def _fork(target, *args) -> int:
    """Run target(*args) in a forked child that exits without any cleanup (like a killed process)."""
    import os

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            import threading

            import tqdm.auto
            import tqdm.std
            from transformers.utils import logging as hf_logging

            # tqdm's default lock is a multiprocessing semaphore shared with the parent across fork: a child
            # killed while holding it would block the parent's progress bars forever. No bars in children.
            hf_logging.disable_progress_bar()
            for cls in (tqdm.std.tqdm, tqdm.auto.tqdm):
                cls.set_lock(threading.RLock())
            torch.set_num_threads(1)
            target(*args)
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid


def _wait(pid: int, timeout: float = 60.0) -> int:
    import os
    import signal
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} did not finish in {timeout} s")


def _which(folder: Path, sigs: dict[str, str]) -> str:
    from sparse_nlp.models import load_model

    sig = _signature(*load_model(folder))
    return next((k for k, v in sigs.items() if v == sig), "MIXED")


def test_concurrent_readers_and_writers_never_see_a_mix(tmp_path, two_saves):
    """3 reader and 2 writer processes on one folder for a bounded time: every load is exactly A or B."""
    import os
    import time

    models, sigs = two_saves
    folder = tmp_path / "ckpt"
    save_pretrained(models["A"][0], folder, tokenizer=models["A"][1])
    results = tmp_path / "results"
    results.mkdir()
    seconds = float(os.environ.get("SPARSE_NLP_FAULT_SECONDS", "4"))  # longer runs for the results page
    start = time.monotonic() + 0.5

    def writer(i: int) -> None:
        time.sleep(max(0.0, start - time.monotonic()))
        n = 0
        while time.monotonic() < start + seconds:
            model, tok = models["AB"[(n + i) % 2]]
            save_pretrained(model, folder, tokenizer=tok)
            n += 1
        (results / f"w{i}").write_text(str(n))

    def reader(i: int) -> None:
        time.sleep(max(0.0, start - time.monotonic()))
        seen = {"A": 0, "B": 0, "MIXED": 0, "error": 0}
        errors = []
        while time.monotonic() < start + seconds:
            try:
                seen[_which(folder, sigs)] += 1
            except Exception as err:  # noqa: BLE001  (counted and reported)
                seen["error"] += 1
                errors.append(f"{type(err).__name__}: {err}"[:300])
        (results / f"r{i}").write_text(json.dumps({"seen": seen, "errors": errors[:3]}))

    pids = [_fork(writer, i) for i in range(2)] + [_fork(reader, i) for i in range(3)]
    assert [_wait(pid, 120) for pid in pids] == [0] * len(pids)
    saves = sum(int((results / f"w{i}").read_text()) for i in range(2))
    reads = [json.loads((results / f"r{i}").read_text()) for i in range(3)]
    seen = {k: sum(r["seen"][k] for r in reads) for k in ("A", "B", "MIXED", "error")}
    _count("concurrent_saves", saves)
    _count("concurrent_loads", sum(seen.values()))
    _count("concurrent_mixed_loads", seen["MIXED"])
    _count("concurrent_load_errors", seen["error"])
    assert seen["MIXED"] == 0 and seen["error"] == 0, reads
    assert saves >= 4 and all(sum(r["seen"].values()) >= 1 for r in reads), (saves, reads)
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert _which(folder, sigs) in ("A", "B")
    assert os.path.isdir(folder)


_KILL_TARGETS = ("_fsync", "_stamp_save_id", "file_sha256", "_write_json", "_exchange", "_fault_point")


def _save_killed_at(k: int, folder: Path, model, tok, exchange: bool) -> None:
    """In a child: save, and SIGKILL ourselves at the k-th call of any file step of the save."""
    import os
    import signal

    import sparse_nlp.checkpoint as ck

    calls = [0]

    def wrap(fn):
        def step(*args, **kwargs):
            calls[0] += 1
            if calls[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return step

    for name in _KILL_TARGETS:
        setattr(ck, name, wrap(getattr(ck, name)))
    if not exchange:
        ck._exchange = wrap(lambda a, b: False)
    rename = os.rename
    os.rename = wrap(rename)
    save_pretrained(model, folder, tokenizer=tok)


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_sigkill_at_every_step_of_a_save_leaves_old_or_new(tmp_path, two_saves, exchange, caplog):
    import signal

    models, sigs = two_saves
    folder = tmp_path / "ckpt"
    outcomes = {"A": 0, "B": 0}
    k = 0
    while True:
        k += 1
        save_pretrained(models["A"][0], folder, tokenizer=models["A"][1])
        (folder / "trainer").mkdir(exist_ok=True)  # not part of the checkpoint: must survive every save
        (folder / "trainer" / "state.txt").write_text("keep")
        code = _wait(_fork(_save_killed_at, k, folder, *models["B"], exchange))
        if code == 0:
            break  # the save finished before step k: every step was tried
        assert code == -signal.SIGKILL
        _count("save_kills")
        if not folder.exists():  # two-rename fallback killed between its renames: the next save restores it
            assert not exchange
            with caplog.at_level("WARNING"):
                save_pretrained(models["A"][0], tmp_path / "other")
                save_pretrained(models["A"][0], folder, tokenizer=models["A"][1])
            outcomes["A"] += 1
            continue
        got = _which(folder, sigs)
        _count("loads_after_kill")
        assert got in ("A", "B"), f"killed at step {k}: the folder is a mix"
        outcomes[got] += 1
        if k % 2:  # the Trainer folder is in the checkpoint folder, or put back by recover()
            recover(folder)
            assert (folder / "trainer" / "state.txt").read_text() == "keep", f"step {k}"
        caplog.clear()
        with caplog.at_level("WARNING"):  # the next save removes the leftovers and says so
            save_pretrained(models["A"][0], folder, tokenizer=models["A"][1])
        hidden = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
        assert hidden == [], hidden
        assert (folder / "trainer" / "state.txt").read_text() == "keep", f"step {k}"
    assert k > 10 and outcomes["A"] and outcomes["B"], (k, outcomes)
    assert _which(folder, sigs) == "B"


def test_sigkill_at_random_times_of_repeated_saves(tmp_path, two_saves):
    import os
    import random
    import signal
    import time

    models, sigs = two_saves
    folder = tmp_path / "ckpt"
    save_pretrained(models["A"][0], folder, tokenizer=models["A"][1])

    def loop() -> None:
        n = 0
        while True:
            model, tok = models["AB"[n % 2]]
            save_pretrained(model, folder, tokenizer=tok)
            n += 1

    rng = random.Random(0)
    for _ in range(6):
        pid = _fork(loop)
        time.sleep(rng.uniform(0.2, 1.0))
        os.kill(pid, signal.SIGKILL)
        assert _wait(pid) == -signal.SIGKILL
        _count("save_kills_random")
        assert _which(folder, sigs) in ("A", "B")
        _count("loads_after_kill")


def test_a_held_lock_makes_a_second_writer_wait(tmp_path, two_saves):
    import time

    import sparse_nlp.checkpoint as ck

    models, sigs = two_saves
    folder = tmp_path / "ckpt"
    save_pretrained(models["A"][0], folder, tokenizer=models["A"][1])
    with ck._save_lock(folder):
        pid = _fork(lambda: save_pretrained(models["B"][0], folder, tokenizer=models["B"][1]))
        time.sleep(1.5)
        assert _which(folder, sigs) == "A"  # the writer waits for the lock
    assert _wait(pid) == 0
    assert _which(folder, sigs) == "B"


# ---- 2. integrity: every single-byte / single-bit / same-size change is named on load ----------------------


def _flip(path: Path, offset: int, bit: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= (1 << bit) if bit is not None else 0xFF
    path.write_bytes(bytes(data))


def _damage_cases(folder: Path) -> list[tuple[str, int, int | None]]:
    """(file, offset, bit or None for a whole byte): first, middle and last byte, and one bit, of every file."""
    manifest = json.loads((folder / "config.json").read_text())["sparse_nlp"]["files"]
    cases = []
    for name, size in manifest.items():
        for offset in sorted({0, size // 2, size - 1}):
            cases.append((name, offset, None))
        cases.append((name, (size * 3) // 4, 5))
    return cases


@pytest.mark.parametrize("compact", [False, True], ids=["dense", "compact"])
def test_every_single_byte_and_bit_change_is_named(tmp_path, compact):
    import shutil

    from sparse_nlp import from_pretrained
    from sparse_nlp.errors import SparseNLPError

    good = tmp_path / "good"
    save_pretrained(_sparse(), good, tokenizer=_tokenizer(), compact=compact)
    cases = _damage_cases(good)
    for name, offset, bit in cases:
        folder = tmp_path / "bad"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(good, folder)
        _flip(folder / name, offset, bit)
        _count("corruptions")
        with pytest.raises(SparseNLPError) as err:
            from_pretrained(folder)
        assert name in str(err.value), (name, offset, bit, str(err.value))
        _count("corruptions_caught")
    assert len(cases) >= 20


def test_same_size_edits_are_named(tmp_path):
    """Two token ids swapped in tokenizer.json; a mask bit flipped from pruned to kept; a file of another save."""
    import shutil

    from sparse_nlp import CheckpointError, from_pretrained
    from sparse_nlp.checkpoint import load_masks, write_masks

    good = tmp_path / "good"
    save_pretrained(_sparse(), good, tokenizer=_tokenizer())
    # tokenizer.json with w2 and w3 swapped: same size, other ids
    bad = tmp_path / "tok"
    shutil.copytree(good, bad)
    text = (bad / "tokenizer.json").read_text()
    swapped = text.replace('"w2": 2', '"w2": X').replace('"w3": 3', '"w3": 2').replace('"w2": X', '"w2": 3')
    assert swapped != text and len(swapped) == len(text)
    (bad / "tokenizer.json").write_text(swapped)
    _count("corruptions")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: tokenizer file content differs"):
        from_pretrained(bad)
    _count("corruptions_caught")
    # a mask bit from pruned to kept, hashes fixed up (as a careful forger would) or skipped: still caught
    for fix_hash in (True, False):
        bad = tmp_path / f"mask-{fix_hash}"
        shutil.copytree(good, bad)
        masks = load_masks(bad / "sparse_masks.safetensors")
        name = next(iter(masks))
        row, col = (~masks[name]).nonzero()[0].tolist()
        masks[name][row, col] = True
        write_masks(masks, bad / "sparse_masks.safetensors")
        raw = json.loads((bad / "config.json").read_text())
        meta = raw["sparse_nlp"]
        meta["files"]["sparse_masks.safetensors"] = (bad / "sparse_masks.safetensors").stat().st_size
        if fix_hash:
            from sparse_nlp.checkpoint import _stamp_save_id, file_sha256

            _stamp_save_id(bad / "sparse_masks.safetensors", meta["save_id"])
            meta["files"]["sparse_masks.safetensors"] = (bad / "sparse_masks.safetensors").stat().st_size
            meta["sha256"]["sparse_masks.safetensors"] = file_sha256(bad / "sparse_masks.safetensors")
        (bad / "config.json").write_text(json.dumps(raw))
        _count("corruptions")
        with pytest.raises(CheckpointError, match="sparse_masks.safetensors"):
            from_pretrained(bad, check_hashes=fix_hash)
        _count("corruptions_caught")
    # the same model saved again: same sizes, other save id and bytes -> named as another save
    other = tmp_path / "other"
    save_pretrained(_sparse(), other, tokenizer=_tokenizer())
    assert (other / "model.safetensors").stat().st_size == (good / "model.safetensors").stat().st_size
    for check_hashes, message in ((True, "content differs"), (False, "mixes files of two saves")):
        bad = tmp_path / f"mixed-{check_hashes}"
        shutil.copytree(good, bad)
        shutil.copy(other / "model.safetensors", bad / "model.safetensors")
        _count("corruptions")
        with pytest.raises(CheckpointError, match=rf"model\.safetensors.*{message}"):
            from_pretrained(bad, check_hashes=check_hashes)
        _count("corruptions_caught")


def test_hash_opt_out_still_checks_sizes_and_headers(tmp_path, monkeypatch):
    from sparse_nlp import CheckpointError, from_pretrained

    folder = tmp_path / "m"
    save_pretrained(_sparse(), folder, tokenizer=_tokenizer())
    _flip(folder / "tokenizer.json", 10)
    monkeypatch.setenv("SPARSE_NLP_VERIFY_HASHES", "0")
    from_pretrained(folder)  # a same-size change is not seen without hashes (documented)
    (folder / "vocab.txt").write_text("x") if (folder / "vocab.txt").exists() else None
    with (folder / "model.safetensors").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        from_pretrained(folder)


def test_old_checkpoints_without_hashes_still_load(tmp_path):
    """A checkpoint written before save ids and hashes (no sha256 / save_id / kept_zeros) loads as before."""
    from sparse_nlp import from_pretrained

    folder = tmp_path / "old"
    model = _sparse()
    save_pretrained(model, folder, tokenizer=_tokenizer())
    raw = json.loads((folder / "config.json").read_text())
    for key in ("sha256", "save_id", "kept_zeros"):
        raw["sparse_nlp"].pop(key)
    (folder / "config.json").write_text(json.dumps(raw))
    loaded = from_pretrained(folder)
    assert _signature(loaded) == _signature(from_pretrained(folder))
    assert torch.equal(
        loaded.state_dict()["bert.encoder.layer.0.output.dense.weight"],
        model.state_dict()["bert.encoder.layer.0.output.dense.weight"],
    )


# ---- 8. metadata types, paths, shortened lists, removed keys, full disk, missing weights ----------------


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(files="model.safetensors"), "files must be an object"),
        (lambda m: m.update(files=["model.safetensors"]), "files must be an object"),
        (lambda m: m.update(tokenizer_files=7), "tokenizer_files must be a list"),
        (lambda m: m["files"].update({"../outside.bin": 3}), "not a plain file name"),
        (lambda m: m["files"].update({"/etc/hostname": 3}), "not a plain file name"),
        (lambda m: m["files"].update({"model.safetensors": "big"}), "must be a size in bytes"),
        (lambda m: m["sha256"].update({"model.safetensors": "abc"}), "64 lowercase hex"),
        (lambda m: m.update(save_id=5), "save_id must be a non-empty string"),
        (lambda m: m.update(kept_zeros=[1]), "kept_zeros must be an object"),
        (lambda m: m.update(masked_modules=m["masked_modules"][:-2]), "does not list"),
        (lambda m: m.clear(), "no 'sparse_nlp' key"),
    ],
    ids=[
        "files-str",
        "files-list",
        "tokenizer-number",
        "dotdot",
        "absolute",
        "size-str",
        "sha-short",
        "save-id-int",
        "kept-zeros-list",
        "masked-short",
        "key-removed",
    ],
)
def test_bad_metadata_is_one_error_line(tmp_path, capsys, edit, message):
    folder = tmp_path / "m"
    save_pretrained(_sparse(), folder, tokenizer=_tokenizer())
    raw = json.loads((folder / "config.json").read_text())
    edit(raw["sparse_nlp"])
    if not raw["sparse_nlp"]:
        del raw["sparse_nlp"]
    (folder / "config.json").write_text(json.dumps(raw))
    _count("metadata_faults")
    assert main(["report", str(folder)]) == 2
    assert message in _error_line(capsys)
    _count("metadata_faults_caught")


def test_full_disk_and_missing_weights_are_one_error_line(tmp_path, capsys, monkeypatch):
    import errno

    import sparse_nlp.checkpoint as ck

    src = tmp_path / "dense"
    tiny_model("bert").save_pretrained(src)
    out = tmp_path / "out"
    argv = ["sparsify", str(src), "--out", str(out), "--sparsity", "0.5"]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ck, "_fsync", full)
    assert main([*argv[:-1], "0.8"]) == 2
    line = _error_line(capsys)
    assert "No space left on device" in line and "free some space" in line and str(out) in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old checkpoint is intact
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    monkeypatch.undo()
    (src / "model.safetensors").unlink()
    assert main(["report", str(src)]) == 2
    assert "no weights" in _error_line(capsys)


# ---- 4. a training run killed at random times resumes from its newest complete checkpoint ------------------


def _train(out: Path, max_steps: int, resume_from: Path | None = None):
    """A tiny pruning run with a checkpoint every step (Trainer + SparsityCallback + KeepNewestComplete)."""
    from transformers import Trainer, TrainingArguments

    from sparse_nlp.pruning.schedules import CubicSchedule
    from sparse_nlp.training.callback import SparsityCallback
    from sparse_nlp.training.pruner import GradualPruner
    from sparse_nlp.training.resume import KeepNewestComplete

    model = tiny_model("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    rule = WeightSparsity(method="magnitude", sparsity=0.8)
    pruner = GradualPruner(model, [rule], CubicSchedule(start_step=0, end_step=20, update_every=2))
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=None,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1000,
        seed=3,
        dataloader_num_workers=0,
    )
    g = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": torch.randint(3, VOCAB, (8,), generator=g).tolist(), "labels": i % 2} for i in range(64)
    ]
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        callbacks=[SparsityCallback(pruner, finish_at_end=False), KeepNewestComplete(pruning=True)],
    )
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return trainer, pruner


def test_training_killed_at_random_times_resumes_from_newest_complete(tmp_path):
    import os
    import random
    import signal
    import time

    from sparse_nlp.training.resume import newest_complete

    out = tmp_path / "trainer"
    rng = random.Random(1)
    resumed = 0
    for _ in range(3):
        pid = _fork(_train, out, 10_000)
        deadline = time.monotonic() + 60
        while not list(out.glob("checkpoint-*/sparse_pruner.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        os.kill(pid, signal.SIGKILL)
        assert _wait(pid) == -signal.SIGKILL
        _count("training_kills")
        chosen, skipped = newest_complete(out, pruning=True)
        assert chosen is not None, skipped  # a complete checkpoint survives every kill
        assert len(skipped) <= 1  # at most the one being written when the kill came
        step = int(chosen.name.split("-")[1])
        trainer, pruner = _train(out, step + 1, resume_from=chosen)  # resuming works
        assert trainer.state.global_step == step + 1 and pruner.applied_step >= min(step, 20) - 2
        resumed += 1
        _count("training_resumes")
    assert resumed == 3
