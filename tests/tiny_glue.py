"""A tiny BERT with a word-level tokenizer, and a tiny GLUE data directory, for fast training tests."""

from __future__ import annotations

import random
from pathlib import Path

import torch
import transformers

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(123)]


def tiny_bert_folder(path: Path, num_labels: int = 2, seed: int = 0) -> Path:
    """Save a 2-layer random BERT classifier (no dropout, so runs are reproducible) and its tokenizer."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertForSequenceClassification(config)
    model.save_pretrained(path)
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(path)
    return path


def _sentence(rng: random.Random, label: int) -> str:
    # label 1 sentences use the first half of the vocabulary more often: learnable in a few steps
    words = []
    for _ in range(rng.randint(3, 9)):
        low = (rng.random() < 0.8) == bool(label)
        words.append(f"w{rng.randrange(0, 60) if low else rng.randrange(60, 123)}")
    return " ".join(words)


HEADERS = {
    "sst2": "sentence\tlabel",
    "cola": None,  # no header row
    "mrpc": "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
    "stsb": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
    "qqp": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
    "mnli": "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse"
    "\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label",
    "mnli-dev": "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse"
    "\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label",
    "qnli": "index\tquestion\tsentence\tlabel",
    "rte": "index\tsentence1\tsentence2\tlabel",
    "wnli": "index\tsentence1\tsentence2\tlabel",
}
"""Each task's header row as the GLUE download writes it."""
TASK_FILES = {
    task: ("train", "dev") for task in ("sst2", "rte", "stsb", "cola", "mrpc", "qqp", "qnli", "wnli")
} | {"mnli": ("train", "dev_matched", "dev_mismatched")}
MNLI_LABELS = ("entailment", "neutral", "contradiction")


def glue_line(task: str, i: int, a: str, b: str, label, dev: bool = False) -> str:
    """One row of `task` in its original GLUE columns; `label` is the label id (a float for stsb)."""
    nli = ["entailment", "not_entailment"]
    if task == "sst2":
        return f"{a} \t{label}"
    if task == "cola":
        return f"gj04\t{label}\t{'' if label else '*'}\t{a}"
    if task == "mrpc":
        return f"{label}\t{1000 + i}\t{2000 + i}\t{a}\t{b}"
    if task == "stsb":
        return f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{a}\t{b}\t{label:.2f}"
    if task == "qqp":
        return f"{i}\t{2 * i}\t{2 * i + 1}\t{a}\t{b}\t{label}"
    if task == "mnli":
        name = label if isinstance(label, str) else MNLI_LABELS[label]  # "-": no gold label
        votes = "\t".join([MNLI_LABELS[0]] * (5 if dev else 1))
        return f"{i}\t{31193 + i}\t{31193 + i}n\tfiction\t( {a} )\t( {b} )\t(ROOT {a})\t(ROOT {b})\t{a}\t{b}\t{votes}\t{name}"
    if task == "qnli":
        return f"{i}\t{a}?\t{b}\t{nli[label]}"
    if task == "rte":
        return f"{i}\t{a}\t{b}\t{nli[label]}"
    if task == "wnli":
        return f"{i}\t{a}\t{b}\t{label}"
    raise KeyError(task)


def write_glue_file(folder: Path, task: str, split: str, lines: list[str]) -> Path:
    """Write one split of a task with its header (MNLI dev files have five annotator columns)."""
    folder.mkdir(parents=True, exist_ok=True)
    header = HEADERS["mnli-dev" if task == "mnli" and split != "train" else task]
    path = folder / f"{split}.tsv"
    path.write_text(("" if header is None else header + "\n") + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_glue_dir(root: Path, rows: int = 64, seed: int = 0, tasks=None) -> Path:
    """GLUE-shaped TSVs of every task (or `tasks`) under ``root/glue``, in each task's original columns, with
    learnable labels (see `_sentence`)."""
    rng = random.Random(seed)
    for task in tasks or TASK_FILES:
        for split in TASK_FILES[task]:
            lines = []
            for i in range(rows):
                label = rng.randint(0, 2 if task == "mnli" else 1)
                a = _sentence(rng, label % 2)
                b = _sentence(rng, label % 2) if task not in ("sst2", "cola") else ""
                value = label * 4 + rng.random() if task == "stsb" else label
                lines.append(glue_line(task, i, a, b, value, dev=split != "train"))
            write_glue_file(root / "glue" / task, task, split, lines)
    return root
