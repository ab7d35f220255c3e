"""Real data sets, read from a local data directory (offline) or from the Hub by name.

The data directory comes from an argument or the ``SPARSE_NLP_DATA_DIR`` environment variable and is laid
out like ``../shared/data``::

    glue/<task>/{train,dev}.tsv   (every GLUE task; MNLI: train.tsv, dev_matched.tsv, dev_mismatched.tsv)
    wikitext-2-raw/wiki.{valid,test}.raw                    tinyshakespeare/input.txt

Without a data directory the Hub data sets are used (``glue/<task>``, ``wikitext/wikitext-2-raw-v1``).
GLUE TSVs are read with quoting off: their fields often begin with a literal ``"``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..errors import DataError
from .glue import GLUE, HUB_DATASET, GlueTask

DATA_DIR_ENV = "SPARSE_NLP_DATA_DIR"

logger = logging.getLogger(__name__)

# task -> how to read it: text columns, label column, regression, num_labels (a view of the GLUE table)
GLUE_TASKS: dict[str, dict] = {
    name: {"text": t.text, "label": t.label, "regression": t.regression, "num_labels": t.num_labels}
    for name, t in GLUE.items()
    if t.evaluable
}
TEXT_CORPORA = {
    "wikitext2": {"valid": "wikitext-2-raw/wiki.valid.raw", "test": "wikitext-2-raw/wiki.test.raw"},
    "tinyshakespeare": {"train": "tinyshakespeare/input.txt"},
}


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The data directory from the argument, else ``$SPARSE_NLP_DATA_DIR``, else None (use the Hub)."""
    value = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(
            f"data directory {str(path)!r} does not exist (from {'--data-dir' if data_dir else DATA_DIR_ENV})."
        )
    return path


def _task_info(task: str) -> GlueTask:
    if task not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; known: {', '.join(GLUE_TASKS)}.")
    return GLUE[task]


def glue_splits(task: str) -> list[str]:
    """The split names a GLUE task accepts: ``train``, ``dev`` (``validation``) and its evaluation files
    (MNLI: ``dev_matched``, ``dev_mismatched``; ``dev`` is the first of them)."""
    info = _task_info(task)
    return list(dict.fromkeys(["train", "dev", "validation", *(s.file for s in info.eval_splits)]))


def _split_source(task: str, split: str) -> tuple[str, str]:
    """(local file stem, Hub split) of a task's split."""
    info = _task_info(task)
    if split == "train":
        return "train", "train"
    if split in ("dev", "validation"):
        return info.eval_splits[0].file, info.eval_splits[0].hub
    for s in info.eval_splits:
        if split == s.file:
            return s.file, s.hub
    raise ValueError(f"unknown split {split!r} of {task}; use one of {', '.join(glue_splits(task))}.")


def glue_file(task: str, split: str, data_dir: Path) -> Path:
    """Path of a GLUE split in the data directory; a missing file names every place looked at.

    Looked for, in order: ``glue/<task>/``, ``<task>/``, and the official download's folders
    ``<FOLDER>/`` and ``glue_data/<FOLDER>/`` (``MRPC``, ``SST-2``, ...).
    """
    info = _task_info(task)
    stem, _ = _split_source(task, split)
    name = f"{stem}.tsv"
    candidates = [
        data_dir / "glue" / task / name,
        data_dir / task / name,
        data_dir / info.folder / name,
        data_dir / "glue_data" / info.folder / name,
    ]
    for c in candidates:
        if c.is_file():
            return c
    raise DataError(
        f"no {task} {split} split in data directory {str(data_dir)!r}; looked for: "
        + ", ".join(str(c) for c in candidates)
    )


def read_tsv(
    path: Path, *, header: bool = True, names: tuple[str, ...] = (), keep: tuple[str, ...] | None = None
) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """A GLUE-style TSV as (columns, [(line number, fields), ...]), read the robust way.

    Quoting is off (fields often begin with a literal ``"``, and QQP / MNLI have unbalanced quotes), rows end
    at ``\\n`` only (a stray ``\\r`` inside a field does not split it), a byte-order mark is dropped, blank
    lines are ignored, and rows with the wrong number of fields are skipped with one warning that counts them.
    The file is streamed; with `keep` (column names, all present) each row holds only those fields, in order.
    """
    bad: list[int] = []
    rows: list[tuple[int, list[str]]] = []
    try:
        with open(path, encoding="utf-8-sig", newline="\n") as f:
            columns, number = list(names), 0
            if header:
                for number, line in enumerate(f, start=1):  # noqa: B007  (the header's line number is kept)
                    if line.strip():
                        columns = line.rstrip("\r\n").split("\t")
                        break
                else:
                    raise DataError(f"{path} is empty; a GLUE TSV starts with a header row.")
            where = (
                [columns.index(c) for c in keep] if keep is not None and set(keep) <= set(columns) else None
            )
            first = number + 1
            for number, line in enumerate(f, start=first):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                fields = line.split("\t")
                if len(fields) != len(columns):
                    bad.append(number)
                    continue
                rows.append((number, [fields[i] for i in where] if where is not None else fields))
    except UnicodeDecodeError as err:
        raise DataError(f"cannot read {path}: not UTF-8 text (byte {err.start}).") from None
    if bad:
        logger.warning(
            "%s: skipped %d malformed row(s) with a field count other than %d (line(s) %s%s)",
            path,
            len(bad),
            len(columns),
            ", ".join(map(str, bad[:5])),
            ", ..." if len(bad) > 5 else "",
        )
    return columns, rows


def load_glue_rows(task: str, split: str, data_dir: str | os.PathLike | None = None) -> dict[str, list]:
    """A GLUE split as columns: ``{"text": [...], "text_pair": [...] or None, "label": [...]}``.

    Labels are the Hub ``glue`` ids (floats for STS-B). Rows whose label marks no gold label (MNLI ``-``) and
    malformed rows are skipped with a warning that counts them.

    Args:
        task: A GLUE task name (``sst2``, ``mrpc``, ``mnli``, ...; see `sparse_nlp.evaluation.glue.GLUE`).
        split: ``train`` or ``dev`` (``validation`` is an alias); MNLI also ``dev_matched`` (= ``dev``) and
            ``dev_mismatched``.
        data_dir: Local data directory; default ``$SPARSE_NLP_DATA_DIR``, then the Hub ``glue/<task>``.

    Raises:
        DataError: a missing file or column (the message lists the columns found), or a label outside the
            task's label set (the message names the file and line).
    """
    info = _task_info(task)
    _split_source(task, split)
    root = resolve_data_dir(data_dir)
    if root is None:
        return _load_glue_hub(task, split, info)
    path = glue_file(task, split, root)
    wanted = (*info.text, info.label)
    columns, rows = read_tsv(path, header=info.header, names=info.names, keep=wanted)
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise DataError(
            f"{path} lacks column(s) {missing} ({task} reads {list(info.text)} and label {info.label!r}); "
            f"found {columns}."
        )
    where = {c: i for i, c in enumerate(wanted)}
    ids = info.label_ids
    texts, pairs, labels, no_gold = [], [], [], 0
    for number, fields in rows:
        value = fields[where[info.label]].strip()
        if value in info.skip_labels:
            no_gold += 1
            continue
        if info.regression:
            try:
                labels.append(float(value))
            except ValueError:
                raise DataError(
                    f"{path}, line {number}: {info.label} {value!r} is not a number ({task} is a regression task)."
                ) from None
        elif value in ids:
            labels.append(ids[value])
        else:
            raise DataError(
                f"{path}, line {number}: {info.label} {value!r} is not a {task} label; expected one of "
                f"{', '.join(ids)}."
            )
        texts.append(fields[where[info.text[0]]])
        if info.pair:
            pairs.append(fields[where[info.text[1]]])
    if no_gold:
        logger.warning(
            "%s: skipped %d row(s) without a gold label (%s %s)",
            path,
            no_gold,
            info.label,
            " / ".join(repr(v) for v in info.skip_labels),
        )
    return {"text": texts, "text_pair": pairs if info.pair else None, "label": labels}


def _hub_dataset(what: str, local: str, *args: Any, hint: str | None = None, **kwargs: Any) -> Any:
    """``datasets.load_dataset(*args, **kwargs)`` without a data directory; a clear `DataError` at once when
    the Hub cannot be used (offline mode, or no answer within a few seconds) and the data are not cached.

    `what` names the data set, `local` where in a data directory it would have been found; `hint` replaces
    the advice that ends the error.
    """
    import datasets

    hint = hint or (
        f"no data directory was given (--data-dir or ${DATA_DIR_ENV}), so {what} was asked of the Hub; "
        f"with a data directory DIR it is read from DIR/{local}"
    )
    from datasets.exceptions import DatasetNotFoundError

    unreachable = _hub_reachable()
    saved = datasets.config.HF_HUB_OFFLINE
    if unreachable:  # only the cache can serve: no retries against a Hub that does not answer
        datasets.config.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(*args, **kwargs)
    except (ConnectionError, OSError, DatasetNotFoundError) as err:
        reason = unreachable or str(err).strip().splitlines()[0][:200] or type(err).__name__
        raise DataError(f"{what}: the Hub cannot be used and it is not cached ({reason}); {hint}.") from None
    finally:
        datasets.config.HF_HUB_OFFLINE = saved


def _hub_reachable(timeout: float = 3.0) -> str | None:
    """None when the Hub answers a TCP connect within `timeout` s, else why not (offline mode included)."""
    import socket
    from urllib.parse import urlsplit

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ).lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set"
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as err:
        return f"{url.hostname}:{port} does not answer ({err})"
    return None


def _load_glue_hub(task: str, split: str, info: GlueTask) -> dict[str, list]:
    stem, hub_split = _split_source(task, split)
    ds = _hub_dataset(f"GLUE {task} {split}", f"glue/{task}/{stem}.tsv", HUB_DATASET, task, split=hub_split)
    texts = info.hub_columns
    keep = [i for i, label in enumerate(ds["label"]) if label != -1]  # -1: no gold label
    pick = (lambda column: [column[i] for i in keep]) if len(keep) < len(ds) else list
    return {
        "text": pick(ds[texts[0]]),
        "text_pair": pick(ds[texts[1]]) if len(texts) > 1 else None,
        "label": pick(ds["label"]),
    }


def load_text(corpus: str, split: str, data_dir: str | os.PathLike | None = None) -> str:
    """A raw text corpus as one string (``wikitext2`` valid/test, ``tinyshakespeare`` train).

    WikiText-2 is joined the usual perplexity way, ``"\\n\\n".join(rows)`` over the Hugging Face
    ``wikitext-2-raw-v1`` rows; from the raw file each line becomes a row ``line + "\\n"`` when it has text
    and ``""`` when blank (the raw file's blank lines are a single space), which gives the Hub rows exactly.
    """
    if corpus not in TEXT_CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; known: {', '.join(TEXT_CORPORA)}.")
    if split not in TEXT_CORPORA[corpus]:
        raise ValueError(f"corpus {corpus!r} has splits {', '.join(TEXT_CORPORA[corpus])}, not {split!r}.")
    root = resolve_data_dir(data_dir)
    if root is None:
        what, local = f"{corpus} {split}", TEXT_CORPORA[corpus][split]
        if corpus == "wikitext2":
            ds = _hub_dataset(
                what,
                local,
                "wikitext",
                "wikitext-2-raw-v1",
                split="validation" if split == "valid" else split,
            )
            return "\n\n".join(ds["text"])
        ds = _hub_dataset(what, local, "karpathy/tiny_shakespeare", split="train")
        return "".join(ds["text"])
    path = root / TEXT_CORPORA[corpus][split]
    if not path.is_file():
        raise DataError(f"no {corpus} {split} text in data directory {str(root)!r}; looked for {path}.")
    text = path.read_text(encoding="utf-8")
    if corpus == "wikitext2":
        lines = text.split("\n")
        if lines and lines[-1] == "":  # the newline that ends the file ends the last line, not a new row
            lines.pop()
        text = wikitext_join(lines)
    return text


def wikitext_join(lines: list[str]) -> str:
    """WikiText raw lines joined as ``"\\n\\n".join`` of the Hub rows (see `load_text`)."""
    return "\n\n".join(line + "\n" if line.strip() else "" for line in lines)


def corpus_file(corpus: str, split: str, data_dir: str | os.PathLike | None = None) -> str:
    """Where `load_text` reads a corpus split: the file relative to the data directory, or the Hub name."""
    root = resolve_data_dir(data_dir)
    if root is None:
        return {
            "wikitext2": "hf:wikitext/wikitext-2-raw-v1",
            "tinyshakespeare": "hf:karpathy/tiny_shakespeare",
        }[corpus] + f":{split}"
    return TEXT_CORPORA[corpus][split]


def load_texts(
    source: str, *, split: str = "train", data_dir: str | os.PathLike | None = None, limit: int | None = None
) -> list[str]:
    """A list of texts for calibration: a GLUE task's sentences or a corpus's non-blank lines."""
    if source in GLUE_TASKS:
        rows = load_glue_rows(source, split, data_dir)
        texts = (
            rows["text"]
            if rows["text_pair"] is None
            else [a + " " + b for a, b in zip(rows["text"], rows["text_pair"])]
        )
    elif source in TEXT_CORPORA:
        corpus_split = split if split in TEXT_CORPORA[source] else next(iter(TEXT_CORPORA[source]))
        texts = [line for line in load_text(source, corpus_split, data_dir).split("\n") if line.strip()]
    else:
        raise ValueError(
            f"unknown text source {source!r}; use a GLUE task ({', '.join(GLUE_TASKS)}) or {', '.join(TEXT_CORPORA)}."
        )
    return texts[:limit] if limit is not None else texts


def calibration_texts(
    source: str | os.PathLike, *, data_dir: str | os.PathLike | None = None, limit: int | None = None
) -> list[str]:
    """Calibration texts from a GLUE task or corpus name (see `load_texts`) or a local .txt file (one text a line)."""
    path = Path(source).expanduser()
    if path.suffix == ".txt" or path.is_file():
        if not path.is_file():
            raise DataError(f"calibration file {str(path)!r} does not exist.")
        texts = [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
        return texts[:limit] if limit is not None else texts
    return load_texts(str(source), split="train", data_dir=data_dir, limit=limit)
