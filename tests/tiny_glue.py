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


def tiny_glue_dir(root: Path, rows: int = 64, seed: int = 0) -> Path:
    """GLUE-shaped TSVs for sst2, rte and stsb under ``root/glue``."""
    rng = random.Random(seed)
    for task in ("sst2", "rte", "stsb"):
        folder = root / "glue" / task
        folder.mkdir(parents=True, exist_ok=True)
        for split in ("train", "dev"):
            lines = []
            for _ in range(rows):
                label = rng.randint(0, 1)
                if task == "sst2":
                    lines.append(f"{_sentence(rng, label)}\t{label}")
                elif task == "rte":
                    lines.append(
                        f"0\t{_sentence(rng, label)}\t{_sentence(rng, label)}\t{['entailment', 'not_entailment'][label]}"
                    )
                else:
                    lines.append(
                        f"x\tx\tx\tx\tx\tx\tx\t{_sentence(rng, label)}\t{_sentence(rng, label)}\t{label * 4 + rng.random():.2f}"
                    )
            header = {
                "sst2": "sentence\tlabel",
                "rte": "index\tsentence1\tsentence2\tlabel",
                "stsb": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
            }[task]
            (folder / f"{split}.tsv").write_text(header + "\n" + "\n".join(lines) + "\n")
    return root
