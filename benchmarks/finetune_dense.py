"""Fine-tune a dense encoder on a GLUE task with the stock transformers Trainer (the baseline every sparse
run is compared with).

    python benchmarks/finetune_dense.py --model minilm --task sst2 --data-dir ../shared/data \
        --out runs/minilm-sst2-dense

Writes the model, tokenizer and ``results.json`` (dev metric, wall time) to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from sparse_nlp.evaluation.data import GLUE_TASKS
from sparse_nlp.evaluation.tasks import compute_task_metrics, encode_glue
from sparse_nlp.models import resolve_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--task", default="sst2", choices=sorted(GLUE_TASKS))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    path = resolve_model(args.model)
    info = GLUE_TASKS[args.task]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=info["num_labels"], problem_type="regression" if info["regression"] else None
    )
    train = encode_glue(tokenizer, args.task, "train", data_dir=args.data_dir, max_length=args.max_length)
    dev = encode_glue(tokenizer, args.task, "dev", data_dir=args.data_dir, max_length=args.max_length)

    def metrics(pred):
        logits, labels = pred
        predictions = logits.squeeze(-1) if info["regression"] else np.argmax(logits, -1)
        return compute_task_metrics(args.task, predictions, labels)

    targs = TrainingArguments(
        output_dir=str(Path(args.out) / "trainer"),
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        weight_decay=0.01,
        warmup_steps=0.06,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=100,
        report_to=[],
        seed=args.seed,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train,
        eval_dataset=dev,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=metrics,
    )
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    result = trainer.evaluate()
    result.update(task=args.task, model=args.model, train_seconds=round(train_s, 1), args=vars(args))
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    Path(args.out, "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
