"""Every GLUE task read from its original TSV columns (quirks included) and scored with its official metric
against a hand computation; your own CSV / JSON lines / Parquet data as a task, through a recipe and the
evaluate command; bad descriptions fail before training with the columns listed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from sparse_nlp.cli import main
from sparse_nlp.errors import ConfigError, DataError
from sparse_nlp.evaluation import tasks as tasks_module
from sparse_nlp.evaluation.custom import TaskSpec, load_custom_rows, load_task_file
from sparse_nlp.evaluation.data import load_glue_rows
from sparse_nlp.evaluation.glue import EVALUABLE, GLUE
from sparse_nlp.evaluation.metrics import load_metric
from sparse_nlp.evaluation.tasks import compute_task_metrics, evaluate_glue, load_for_task, predict
from sparse_nlp.hub import eval_results
from sparse_nlp.recipes import Recipe, load_recipe, run_recipe

from .tiny_glue import glue_line, tiny_bert_folder, tiny_glue_dir, write_glue_file

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# A binary dev set and a known prediction: tp 3, fp 2, fn 1, tn 2.
BIN_LABELS = [1, 0, 1, 1, 0, 0, 1, 0]
BIN_PRED = [1, 1, 0, 1, 1, 0, 1, 0]
ACC = 62.5  # 5 / 8
F1 = 66.67  # 2 * 3 / (2 * 3 + 2 + 1) = 6 / 9
MCC = 25.82  # (3 * 2 - 2 * 1) / sqrt(5 * 4 * 4 * 3) = 4 / sqrt(240) = 0.25820
STSB_LABELS = [0.0, 1.0, 2.0, 3.0, 4.0]
STSB_PRED = [0.5, 1.0, 3.0, 2.5, 5.0]
# Pearson: sum dx*dy = 10.5, sum dx^2 = 10, sum dy^2 = 12.7 -> 10.5 / sqrt(127) = 0.93172
# Spearman: prediction ranks 1 2 4 3 5 -> 1 - 6 * 2 / (5 * 24) = 0.9
MNLI_MATCHED = [0, 1, 2, 0, 1, 2]
MNLI_MATCHED_PRED = [0, 1, 1, 0, 2, 2]  # 4 / 6
MNLI_MISMATCHED = [2, 2, 0, 1]
MNLI_MISMATCHED_PRED = [2, 0, 0, 1]  # 3 / 4

EXPECTED = {
    "cola": {"matthews_correlation": MCC},
    "sst2": {"accuracy": ACC},
    "mrpc": {"f1": F1, "accuracy": ACC},
    "stsb": {"pearson": 93.17, "spearmanr": 90.0},
    "qqp": {"f1": F1, "accuracy": ACC},
    "mnli": {"accuracy": 66.67},
    "qnli": {"accuracy": ACC},
    "rte": {"accuracy": ACC},
    "wnli": {"accuracy": ACC},
}


def _rows(task: str, labels: list, dev: bool = True) -> list[str]:
    # the first text of each file starts with a literal quote that never closes, as real GLUE files do
    return [
        glue_line(task, i, ('"' if i == 0 else "") + f"w{i} w{i + 1} w{i + 2}", f"w{i + 3} w{i + 4}", y, dev)
        for i, y in enumerate(labels)
    ]


@pytest.fixture
def hand_glue(tmp_path) -> Path:
    """A small GLUE folder with known labels and the quirks of the real files: a stray quote, a byte-order
    mark (MRPC), CRLF line ends (RTE), a row with too few fields (QQP, MNLI), MNLI rows with gold label '-'."""
    root = tmp_path / "data"
    for task in GLUE:
        folder = root / "glue" / task
        if task == "stsb":
            labels = STSB_LABELS
        elif task == "mnli":
            write_glue_file(folder, task, "train", _rows(task, MNLI_MATCHED, dev=False))
            write_glue_file(
                folder, task, "dev_matched", _rows(task, [*MNLI_MATCHED[:3], "-", *MNLI_MATCHED[3:]])
            )
            lines = _rows(task, MNLI_MISMATCHED)
            write_glue_file(folder, task, "dev_mismatched", [*lines[:2], "7\t1\tbroken", *lines[2:]])
            continue
        else:
            labels = BIN_LABELS
        lines = _rows(task, labels)
        if task == "qqp":
            lines.insert(3, "99\t1\t2\tonly a question")  # too few fields: skipped with a warning
        for split in ("train", "dev"):
            path = write_glue_file(folder, task, split, lines)
            if task == "mrpc":
                path.write_text("\ufeff" + path.read_text(encoding="utf-8"), encoding="utf-8")
            if task == "rte":
                path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    return root


@pytest.mark.parametrize("task", list(GLUE))
def test_each_task_reads_its_original_columns_and_scores_a_known_prediction(hand_glue, task):
    rows = load_glue_rows(task, "dev", hand_glue)
    labels = {"stsb": STSB_LABELS, "mnli": MNLI_MATCHED}.get(task, BIN_LABELS)
    assert rows["label"] == labels  # string labels mapped to the Hub ids
    assert rows["text"][0].rstrip(" ?") == '"w0 w1 w2'  # SST-2 ends with a space, QNLI questions with '?'
    assert (rows["text_pair"] is not None) == GLUE[task].pair
    if GLUE[task].pair:
        assert rows["text_pair"][1] == "w4 w5"
    pred = {"stsb": STSB_PRED, "mnli": MNLI_MATCHED_PRED}.get(task, BIN_PRED)
    assert compute_task_metrics(task, pred, rows["label"]) == EXPECTED[task]
    official = load_metric("glue", task).compute(predictions=pred, references=rows["label"])
    assert {k: round(100 * v, 2) for k, v in official.items()} == EXPECTED[task]  # the Hub metric agrees


def test_mnli_mismatched_and_gold_label_dash_and_malformed_rows_warn(hand_glue, caplog):
    with caplog.at_level(logging.WARNING, logger="sparse_nlp.evaluation.data"):
        matched = load_glue_rows("mnli", "dev", hand_glue)
        mismatched = load_glue_rows("mnli", "dev_mismatched", hand_glue)
        qqp = load_glue_rows("qqp", "dev", hand_glue)
    assert matched == load_glue_rows("mnli", "dev_matched", hand_glue)
    assert matched["label"] == MNLI_MATCHED and mismatched["label"] == MNLI_MISMATCHED
    assert len(qqp["label"]) == 8
    text = caplog.text
    assert "dev_matched.tsv: skipped 1 row(s) without a gold label" in text
    assert (
        "dev_mismatched.tsv: skipped 1 malformed row(s) with a field count other than 16 (line(s) 4)" in text
    )
    assert "qqp/dev.tsv: skipped 1 malformed row(s) with a field count other than 6 (line(s) 5)" in text
    assert compute_task_metrics("mnli", MNLI_MISMATCHED_PRED, mismatched["label"]) == {"accuracy": 75.0}


def test_bad_glue_files_name_the_line_and_the_columns(hand_glue, tmp_path):
    path = hand_glue / "glue" / "rte" / "dev.tsv"
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentails\n")
    with pytest.raises(
        DataError,
        match=r"rte/dev.tsv, line 2: label 'entails' is not a rte label; expected one of entailment, not_entailment",
    ):
        load_glue_rows("rte", "dev", hand_glue)
    path.write_text("index\tpremise\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(
        DataError,
        match=r"lacks column\(s\) \['sentence1'\].*found \['index', 'premise', 'sentence2', 'label'\]",
    ):
        load_glue_rows("rte", "dev", hand_glue)


def test_official_download_folder_names_are_found(hand_glue, tmp_path):
    download = tmp_path / "download" / "glue_data" / "MRPC"
    download.mkdir(parents=True)
    (download / "dev.tsv").write_bytes((hand_glue / "glue" / "mrpc" / "dev.tsv").read_bytes())
    assert load_glue_rows("mrpc", "dev", tmp_path / "download")["label"] == BIN_LABELS


def test_every_task_is_evaluable_and_published_with_its_split():
    assert sorted(EVALUABLE) == sorted(["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"])
    for name in EVALUABLE:
        Recipe.from_dict({"model": "m", "task": name, "stages": [{"name": "e", "type": "evaluate"}]})
    results = eval_results(
        [
            {"task": "mnli", "split": "dev", "accuracy": 80.1, "accuracy_mismatched": 81.2},
            {"task": "cola", "split": "dev", "matthews_correlation": 50.0},
            {"task": "mrpc", "split": "dev", "f1": 88.0, "accuracy": 84.0},
        ]
    )
    got = [(r.dataset_config, r.dataset_split, r.metric_type, r.metric_value) for r in results]
    assert got == [
        ("mnli", "validation_matched", "accuracy", 80.1),
        ("mnli", "validation_mismatched", "accuracy", 81.2),
        ("cola", "validation", "matthews_correlation", 50.0),
        ("mrpc", "validation", "f1", 88.0),
        ("mrpc", "validation", "accuracy", 84.0),
    ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue-tasks")
    return (
        tiny_bert_folder(root / "model"),
        tiny_bert_folder(root / "model3", num_labels=3),
        tiny_glue_dir(root),
    )


def test_evaluate_command_scores_mrpc_with_f1_and_accuracy(tiny, tmp_path, capsys):
    model_dir, _, data_dir = tiny
    out = tmp_path / "mrpc.json"
    argv = ["evaluate", str(model_dir), "--task", "mrpc", "--data-dir", str(data_dir), "--json", str(out)]
    assert main([*argv, "--max-length", "32", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    model, tokenizer = load_for_task(model_dir, "mrpc")
    rows = load_glue_rows("mrpc", "dev", data_dir)
    features = tokenizer(rows["text"], rows["text_pair"], truncation=True, max_length=32)
    feats = [{k: features[k][i] for k in features} for i in range(len(rows["label"]))]
    pred = predict(model, feats, tokenizer, progress=False).argmax(-1).tolist()
    tp = sum(p == y == 1 for p, y in zip(pred, rows["label"]))
    wrong = sum(p != y for p, y in zip(pred, rows["label"]))
    assert printed["num_examples"] == 64 and printed["main_metric"] == "f1"
    assert printed["accuracy"] == round(100 * (64 - wrong) / 64, 2)
    assert printed["f1"] == round(100 * 2 * tp / (2 * tp + wrong), 2)
    assert json.loads(out.read_text())["f1"] == printed["f1"]


def test_mnli_evaluates_matched_and_mismatched(tiny):
    _, model3, data_dir = tiny
    model, tokenizer = load_for_task(model3, "mnli")
    result = evaluate_glue(model, tokenizer, "mnli", data_dir=data_dir, max_length=32, progress=False)
    assert result["num_examples"] == 64 and result["num_examples_mismatched"] == 64
    assert {"accuracy", "accuracy_mismatched"} <= set(result) and result["main_metric"] == "accuracy"
    only = evaluate_glue(
        model, tokenizer, "mnli", data_dir=data_dir, split="dev_mismatched", max_length=32, progress=False
    )
    assert only["accuracy_mismatched"] == result["accuracy_mismatched"] and "accuracy" not in only


def test_a_base_model_gets_the_task_label_names(tmp_path):
    from transformers import BertConfig, BertModel

    from .tiny_glue import WORDS, tiny_bert_folder

    base = tmp_path / "base"
    tiny_bert_folder(tmp_path / "cls")
    config = BertConfig.from_pretrained(tmp_path / "cls")
    config.architectures = ["BertModel"]
    BertModel(config).save_pretrained(base)
    (base / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    for name in ("tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (tmp_path / "cls" / name).exists():
            (base / name).write_bytes((tmp_path / "cls" / name).read_bytes())
    model, _ = load_for_task(base, "mnli")
    assert model.config.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}
    assert model.config.label2id["contradiction"] == 2


# ---- your own data -------------------------------------------------------------------------------------

RECIPE = """
model: {model}
task: {task}
max_length: 32
stages:
  - name: dense
    type: finetune
    training: {{max_steps: 6, learning_rate: 1e-3, batch_size: 8, logging_steps: 100}}
  - name: gmp
    type: prune
    teacher: dense
    sparsity: {{weights: [{{method: magnitude, sparsity: 0.5, targets: [all-linear]}}]}}
    schedule: {{start_step: 0, end_step: 4, update_every: 2}}
    distillation: {{temperature: 2.0, alpha: 0.5}}
    training: {{max_steps: 6, learning_rate: 1e-3, batch_size: 8, logging_steps: 100}}
  - name: eval
    type: evaluate
"""


def _own_data(root: Path, fmt: str) -> dict[str, str]:
    """Train / dev files of a 2-class review task (labels 'bad' / 'good') from the tiny GLUE SST-2 rows."""
    import pandas as pd

    glue = tiny_glue_dir(root / "src", tasks=["sst2"])
    files = {}
    for split in ("train", "dev"):
        rows = load_glue_rows("sst2", split, glue)
        frame = pd.DataFrame(
            {
                "review": rows["text"],
                "stars": ["good" if y else "bad" for y in rows["label"]],
                "id": range(64),
            }
        )
        path = root / f"{split}.{fmt}"
        if fmt == "csv":
            frame.to_csv(path, index=False)
        elif fmt == "jsonl":
            frame.to_json(path, orient="records", lines=True)
        else:
            frame.to_parquet(path)
        files[split] = str(path)
    return files


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_own_data_round_trips_through_a_recipe_and_evaluate(tmp_path, tiny, fmt, capsys):
    model_dir = tiny[0]
    files = _own_data(tmp_path, fmt)
    task = {
        "name": "reviews",
        "kind": "classification",
        "data_files": files,
        "text": ["review"],
        "label": "stars",
    }
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=model_dir, task=json.dumps(task)))
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "reviews"
    evaluation = results["stages"][-1]
    assert evaluation["task"] == "reviews" and evaluation["num_examples"] == 64
    assert 0 <= evaluation["accuracy"] <= 100 and evaluation["block_sparsity"] == pytest.approx(0.5, abs=1e-3)
    saved = load_recipe(out / "gmp" / "recipe.yaml")
    assert saved.task.labels == ["bad", "good"]  # inferred from train, kept with the checkpoint
    capsys.readouterr()
    task_file = tmp_path / "reviews.yaml"
    task_file.write_text(yaml.safe_dump(task))
    argv = ["evaluate", str(out / "gmp"), "--task", str(task_file), "--max-length", "32", "--no-progress"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["accuracy"] == evaluation["accuracy"]
    assert json.loads((out / "gmp" / "eval_reviews.json").read_text())["accuracy"] == printed["accuracy"]
    config = json.loads((out / "gmp" / "config.json").read_text())
    assert config["id2label"] == {"0": "bad", "1": "good"}


def test_pair_and_regression_descriptions_read_parquet_and_score(tmp_path):
    files = _own_data(tmp_path, "parquet")
    pair = TaskSpec.from_dict(
        {
            "kind": "pair-classification",
            "data_files": files,
            "text": ["review", "stars"],
            "label": "id",
            "labels": list(range(64)),
            "metrics": ["accuracy", "f1", "matthews_correlation"],
        }
    )
    rows = load_custom_rows(pair, "dev")
    assert rows["text_pair"][:2] == [
        "bad" if y == 0 else "good" for y in load_glue_rows("sst2", "dev", tmp_path / "src")["label"][:2]
    ]
    assert rows["label"] == list(range(64))
    scored = compute_task_metrics(pair, [0, 1, 2, 2], [0, 1, 2, 1])
    # macro F1: class 0 1, class 1 2 / 3 (one missed), class 2 2 / 3 (one false alarm)
    assert scored["accuracy"] == 75.0 and scored["f1"] == round(100 * (1 + 2 / 3 + 2 / 3) / 3, 2)
    assert "matthews_correlation" in scored
    regression = TaskSpec.from_dict(
        {"kind": "regression", "data_files": files, "text": ["review"], "label": "id"}
    )
    assert load_custom_rows(regression, "train")["label"][:3] == [0.0, 1.0, 2.0]
    assert compute_task_metrics(regression, STSB_PRED, STSB_LABELS) == {"pearson": 93.17, "spearmanr": 90.0}
    assert tasks_module.task_info(regression).num_labels == 1


@pytest.mark.parametrize(
    "change, message",
    [
        ({"label": "rating"}, r"no label column 'rating'; the columns are 'review', 'stars', 'id'"),
        ({"text": ["body"]}, r"no text column 'body'; the columns are 'review', 'stars', 'id'"),
        ({"labels": ["bad", "great"]}, r"stars 'good' is not in the label list \[bad, great\]"),
        (
            {"kind": "regression"},
            r"row 0: stars '\w+' is not a number; a regression task needs numeric labels",
        ),
    ],
)
def test_bad_descriptions_fail_before_the_model_loads(tmp_path, tiny, monkeypatch, change, message):
    files = _own_data(tmp_path, "csv")
    task = {"kind": "classification", "data_files": files, "text": ["review"], "label": "stars", **change}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=tiny[0], task=json.dumps(task)))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data were checked")

    monkeypatch.setattr(tasks_module, "load_for_task", no_model)
    with pytest.raises(DataError, match=message):
        run_recipe(load_recipe(recipe), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "dense").exists()


@pytest.mark.parametrize(
    "task, message",
    [
        (
            {"kind": "sentiment", "data_files": {"train": "a.csv"}, "text": ["t"]},
            r"task.kind must be one of .*classification",
        ),
        ({"kind": "classification", "text": ["t"]}, r"either data_files .* or dataset"),
        (
            {"kind": "classification", "data_files": {"train": "a.xlsx"}, "text": ["t"]},
            r"a.xlsx' is not a file type",
        ),
        (
            {"kind": "pair-classification", "data_files": {"train": "a.csv"}, "text": ["t"]},
            r"reads two text column",
        ),
        (
            {"kind": "regression", "data_files": {"train": "a.csv"}, "text": ["t"], "metrics": ["accuracy"]},
            r"'accuracy' does not score a regression task",
        ),
        (
            {"kind": "classification", "data_files": {"train": "a.csv"}, "text": ["t"], "lables": ["a"]},
            r"unknown field 'task.lables'",
        ),
    ],
)
def test_bad_descriptions_name_the_field(task, message):
    with pytest.raises(ConfigError, match=message):
        Recipe.from_dict({"model": "m", "task": task, "stages": [{"name": "e", "type": "evaluate"}]})


def test_task_file_errors_name_the_file(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text("kind: classification\ndata_files: {train: missing.csv}\ntext: [t]\n")
    spec = load_task_file(path)
    with pytest.raises(DataError, match=r"data_files.train 'missing.csv' does not exist"):
        load_custom_rows(spec, "train")
    with pytest.raises(DataError, match=r"has no dev file"):
        load_custom_rows(spec, "dev")
    path.write_text("kind: classification\ntext: [t]\n")
    with pytest.raises(ConfigError, match=r"task.yaml: task: give either data_files"):
        load_task_file(path)


@pytest.mark.parametrize("task", list(GLUE))
def test_each_task_shipped_recipe_runs_on_tiny_data(tmp_path, task):
    """The task's shipped recipe, with a tiny model and a few steps, runs end to end on the tiny fixtures."""
    data = yaml.safe_load((RECIPES / f"minilm-{task}-gmp80.yaml").read_text())
    assert data["task"] == task
    data.update(
        model=str(tiny_bert_folder(tmp_path / "model", num_labels=GLUE[task].num_labels)), max_length=32
    )
    for stage in data["stages"]:
        if "training" in stage:
            stage["training"] = {"max_steps": 4, "learning_rate": 1e-3, "batch_size": 8, "logging_steps": 100}
        if "schedule" in stage:
            stage["schedule"] = {"start_step": 0, "end_step": 2, "update_every": 1}
    results = run_recipe(
        Recipe.from_dict(data),
        tmp_path / "out",
        data_dir=tiny_glue_dir(tmp_path, rows=16, tasks=[task]),
        progress=False,
    )
    evaluation = results["stages"][-1]
    assert evaluation["task"] == task and evaluation["num_examples"] == 16
    assert set(GLUE[task].metric_keys) <= set(evaluation)  # MNLI: matched and mismatched
    assert evaluation["block_sparsity"] == pytest.approx(0.8, abs=1e-3)


@pytest.mark.real
@pytest.mark.parametrize("task", ["sst2", "cola", "rte", "stsb"])
def test_real_files_read_as_pandas_with_quoting_off_reads_them(data_dir, task):
    """On the real GLUE files the tab reader gives exactly the rows of pandas with quoting off."""
    import csv

    import pandas as pd

    info = GLUE[task]
    for split in ("train", "dev"):
        rows = load_glue_rows(task, split, data_dir)
        frame = pd.read_csv(
            data_dir / "glue" / task / f"{split}.tsv",
            sep="\t",
            quoting=csv.QUOTE_NONE,
            keep_default_na=False,
            dtype=str,
            header=0 if info.header else None,
            names=list(info.names) or None,
        )
        assert rows["text"] == frame[info.text[0]].tolist()
        assert rows["text_pair"] == (frame[info.text[1]].tolist() if info.pair else None)
        labels = frame[info.label].tolist()
        expected = [float(v) for v in labels] if info.regression else [info.label_ids[v] for v in labels]
        assert rows["label"] == expected


def test_hub_data_sets_map_columns_and_splits(monkeypatch):
    """Without a data directory: GLUE reads the Hub columns (MNLI premise / hypothesis, no -1 rows) and a
    description reads the Hub data set and split it names."""
    import datasets

    seen = []

    def load_dataset(name, config=None, split=None, **kwargs):
        seen.append((name, config, split))
        if name == "nyu-mll/glue":
            return datasets.Dataset.from_dict(
                {
                    "premise": ["a", "b", "c"],
                    "hypothesis": ["x", "y", "z"],
                    "label": [2, -1, 0],
                    "idx": [0, 1, 2],
                }
            )
        return datasets.Dataset.from_dict({"body": ["p", "q", "r"], "score": [1, 0, 1]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.delenv("SPARSE_NLP_DATA_DIR", raising=False)
    rows = load_glue_rows("mnli", "dev_mismatched")
    assert rows == {"text": ["a", "c"], "text_pair": ["x", "z"], "label": [2, 0]}
    spec = TaskSpec.from_dict(
        {
            "kind": "classification",
            "dataset": "someone/reviews",
            "config": "en",
            "splits": {"dev": "test"},
            "text": ["body"],
            "label": "score",
        }
    )
    assert load_custom_rows(spec, "dev")["label"] == [1, 0, 1] and spec.labels == ["0", "1"]
    assert seen == [
        ("nyu-mll/glue", "mnli", "validation_mismatched"),
        ("someone/reviews", "en", "test"),
        ("someone/reviews", "en", "train"),
    ]


def test_read_tsv_splits_rows_at_newlines_only(tmp_path):
    from sparse_nlp.evaluation.data import read_tsv

    path = tmp_path / "x.tsv"
    path.write_bytes(b'\xef\xbb\xbfid\ttext\r\n1\t"a\rb\r\n\n2\t"c"\td\n3\te\n')
    columns, rows = read_tsv(path, keep=("text",))
    assert columns == ["id", "text"]
    assert rows == [(2, ['"a\rb']), (5, ["e"])]  # line 4 has three fields: skipped


def test_tsv_description_numeric_label_order_and_empty_labels(tmp_path):
    from sparse_nlp.evaluation.custom import infer_labels

    assert infer_labels([10, 2, 1, 2.0]) == ["1", "2", "10"]  # numbers in numeric order, 2 and 2.0 are one
    assert infer_labels(["b", "a", "b"]) == ["a", "b"]
    train, dev = tmp_path / "train.tsv", tmp_path / "dev.tsv"
    train.write_text("q\ta\tgrade\nw1\tw2\t10\nw3\tw4\t2\nw5\tw6\t1\n")
    dev.write_text("q\ta\tgrade\nw1\tw2\t2\nw3\tw4\t\n")
    spec = TaskSpec.from_dict(
        {
            "kind": "pair-classification",
            "data_files": {"train": str(train), "dev": str(dev)},
            "text": ["q", "a"],
            "label": "grade",
        }
    )
    assert load_custom_rows(spec, "train") == {
        "text": ["w1", "w3", "w5"],
        "text_pair": ["w2", "w4", "w6"],
        "label": [2, 1, 0],
    }
    assert tasks_module.task_info(spec).label_names == ("1", "2", "10")
    with pytest.raises(DataError, match=r"dev.tsv: row 1 has no 'grade' \(an empty label\)"):
        load_custom_rows(spec, "dev")


def test_evaluate_command_refuses_a_split_the_task_does_not_have(tiny, capsys):
    model_dir, _, data_dir = tiny
    argv = [
        "evaluate",
        str(model_dir),
        "--task",
        "rte",
        "--data-dir",
        str(data_dir),
        "--split",
        "dev_mismatched",
    ]
    assert main(argv) == 2
    assert "task 'rte' has splits train, dev, validation, not 'dev_mismatched'" in capsys.readouterr().err
