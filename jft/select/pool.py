"""The pool and target of a selection: read as `jft.train` reads data, tokenized once, and
the chosen records written back unchanged in the pool's own format.

A JSON-lines pool's chosen lines are copied byte for byte; a JSON array's objects are
re-serialised from the file's own objects (not from datasets' Arrow rows, which add null
fields a record did not have); Parquet rows go through pyarrow's `take`, and a
saved `datasets` folder through `Dataset.select`. CSV rows are read by pandas as
datasets reads them, every value as text, and written back with pandas.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jft.errors import JftError
from jft.training.data import (
    FIELDS,
    DataConfig,
    TokenizedExamples,
    load_examples,
    prompt_ids,
    tokenize_example,
)

# Formats a pool can be read in: one sequence per record.
POOL_FORMATS = ("text", "prompt_completion", "chat")


@dataclass
class Pool:
    """A data file's records and tokens. `answers` holds each record's answer tokens alone,
    without its instruction (BOS, completion, EOS), where the format has an instruction."""

    path: Path
    format: str
    records: object  # a datasets.Dataset
    examples: TokenizedExamples  # tokens and target mask of the whole record
    prompts: TokenizedExamples | None  # the instruction alone (generation input)
    answers: TokenizedExamples | None

    def __len__(self) -> int:
        return len(self.examples)


def detect_format(path: str | os.PathLike) -> str:
    """The format of a data file from its first record's fields."""
    first = _first_record(Path(path))
    for format in ("chat", "prompt_completion", "text"):
        if all(field in first for field in FIELDS[format]):
            return format
    raise JftError(f"{path}: record 0 has fields {', '.join(first) or '(none)'}; a pool needs "
                   '"messages" (chat), "prompt" and "completion", or "text"; or give --format')


def read_pool(path: str | os.PathLike, format: str, tokenizer, max_length: int) -> Pool:
    """Reads and tokenizes a pool or target file; `format` "auto" detects it."""
    path = Path(path)
    format = detect_format(path) if format == "auto" else format
    if format not in POOL_FORMATS:
        raise JftError(f"--format {format!r}; valid: auto, {', '.join(POOL_FORMATS)}")
    records = load_examples(path, format)
    config = DataConfig(train=str(path), format=format, max_length=max_length, packing=False)
    rows = records.select_columns(list(FIELDS[format]))
    examples, prompts, answers = [], [], []
    for index, record in enumerate(rows):
        where = f"{path}: record {index}"
        tokenized = tokenize_example(record, tokenizer, config, where=where)
        examples.append(_cut(tokenized, max_length))
        if format == "text":
            continue
        prompt, answer = _parts(record, tokenized, tokenizer, format)
        prompts.append(_cut(prompt, max_length))
        answers.append(_cut(answer, max_length))
    if format == "text":
        return Pool(path, format, records, TokenizedExamples.from_examples(examples), None, None)
    return Pool(path, format, records, TokenizedExamples.from_examples(examples),
                TokenizedExamples.from_examples(prompts), TokenizedExamples.from_examples(answers))


def _parts(record, tokenized, tokenizer, format):
    """(instruction tokens, answer tokens alone) of one record. A conversation's instruction
    is everything before its first target token; its answer, the assistant turns' text."""
    from jft.training.data import TokenizedExample

    if format == "prompt_completion":
        prompt = prompt_ids(tokenizer, record["prompt"])
        answer = prompt_ids(tokenizer, record["completion"].lstrip())
    else:
        first = tokenized.loss_mask.index(True)
        prompt = tokenized.tokens[:first]
        text = "\n".join(m["content"] for m in record["messages"] if m["role"] == "assistant")
        answer = prompt_ids(tokenizer, text)
    answer = [*answer, tokenizer.eos_id]
    return (TokenizedExample(prompt, [False] * len(prompt)),
            TokenizedExample(answer, [False] + [True] * (len(answer) - 1)))


def _cut(example, max_length: int):
    """Longer examples are cut to `max_length` tokens, as training truncates them."""
    from jft.training.data import TokenizedExample

    if len(example.tokens) <= max_length:
        return example
    return TokenizedExample(example.tokens[:max_length], example.loss_mask[:max_length])


def parse_budget(value: str, pool_size: int) -> int:
    """`--budget`: a count (`500`) or a fraction of the pool (`0.05`, `5%`)."""
    text = str(value).strip()
    try:
        if text.endswith("%"):
            fraction = float(text[:-1]) / 100
        elif "." in text or "e" in text.lower():
            fraction = float(text)
        else:
            count = int(text)
            if count < 1:
                raise ValueError
            return min(count, pool_size)
        if fraction > 1 and fraction.is_integer() and not text.endswith("%"):
            return min(int(fraction), pool_size)  # 1e3: a count written as a float
        if not 0 < fraction <= 1:
            raise ValueError
    except ValueError:
        raise JftError(f"--budget {value!r}; expected a count (500), a fraction in (0, 1] "
                       "(0.05) or a percentage (5%)") from None
    return max(1, round(fraction * pool_size))


# ------------------------------------------------------------------ writing the subset


def output_paths(pool: str | os.PathLike, out: str | os.PathLike) -> tuple[Path, Path]:
    """(the subset, its scores file), refusing to overwrite either or to change the pool's
    kind of file."""
    pool, out = Path(pool), Path(out)
    if pool.is_dir():
        if out.suffix:
            raise JftError(f"--out {out}: the pool is a saved datasets folder, so the subset is "
                           "one too; give a folder path without a suffix")
    elif out.suffix.lower() != pool.suffix.lower():
        raise JftError(f"--out {out}: the subset keeps the pool's format; give a "
                       f"{pool.suffix} path")
    scores = out.with_name(f"{out.name.removesuffix(out.suffix)}.scores.jsonl")
    for path in (out, scores):
        if path.exists():
            raise JftError(f"{path} exists; give another --out or move it away (outputs are "
                           "never overwritten)")
    if not out.parent.is_dir():
        raise JftError(f"--out {out}: folder {out.parent} does not exist")
    return out, scores


def write_subset(pool: Path, indices: np.ndarray, out: Path) -> None:
    """Writes the pool's records at `indices` (in pool order) to `out`, unchanged."""
    chosen = np.sort(np.asarray(indices, np.int64))
    partial = out.with_name(out.name + ".partial")
    if pool.is_dir():
        import datasets

        datasets.load_from_disk(str(pool)).select(chosen).save_to_disk(str(partial))
    elif pool.suffix.lower() == ".jsonl" or (pool.suffix.lower() == ".json"
                                              and not _is_array(pool)):
        keep = set(chosen.tolist())
        with open(partial, "wb") as file:
            for index, line in enumerate(_record_lines(pool)):
                if index in keep:
                    file.write(line if line.endswith(b"\n") else line + b"\n")
    elif pool.suffix.lower() == ".json":
        with open(pool, encoding="utf-8") as file:
            records = json.load(file)
        with open(partial, "w", encoding="utf-8") as file:
            json.dump([records[i] for i in chosen], file, ensure_ascii=False, indent=1)
            file.write("\n")
    elif pool.suffix.lower() == ".csv":
        import pandas as pd

        # Read as datasets reads it (pandas), every value as text so that none is re-typed.
        table = pd.read_csv(pool, dtype=str, keep_default_na=False)
        table.iloc[chosen].to_csv(partial, index=False)
    else:
        import pyarrow.parquet as pq

        pq.write_table(pq.read_table(pool).take(chosen), partial)
    os.replace(partial, out)


def subset_file(pool: Path, indices, folder: Path, name: str) -> Path:
    """`folder/name` + the pool's suffix holding the pool's records at `indices`, written
    once: a rerun finds it (what a resumed training run must read again)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}{'' if pool.is_dir() else pool.suffix}"
    if not path.exists():
        write_subset(pool, indices, path)
    return path


def write_scores(path: Path, scores: np.ndarray, clusters: np.ndarray | None,
                 selected: np.ndarray) -> None:
    """One line per pool record: its index, score (null where the method gave none),
    cluster (null without clusters) and whether it was selected."""
    chosen = np.zeros(len(scores), bool)
    chosen[np.asarray(selected, np.int64)] = True
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as file:
        for index, score in enumerate(np.asarray(scores, np.float64)):
            file.write(json.dumps({
                "index": index,
                "score": None if not np.isfinite(score) else float(score),
                "cluster": None if clusters is None else int(clusters[index]),
                "selected": bool(chosen[index]),
            }) + "\n")
    os.replace(partial, path)


def _record_lines(path: Path) -> Iterator[bytes]:
    """A JSON-lines file's non-blank lines: record i is the i-th (as `load_examples` counts)."""
    with open(path, "rb") as file:
        for line in file:
            if line.strip():
                yield line


def _is_array(path: Path) -> bool:
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1), b""):
            if not chunk.isspace():
                return chunk == b"["
    return False


def _first_record(path: Path) -> dict:
    if path.is_dir() or path.suffix.lower() in (".csv", ".parquet"):
        import datasets

        if path.is_dir():
            records = datasets.load_from_disk(str(path))
        else:
            kind = "csv" if path.suffix.lower() == ".csv" else "parquet"
            records = datasets.load_dataset(kind, data_files=str(path), split="train")
        return dict(records[0]) if len(records) else {}
    if not path.is_file():
        raise JftError(f"{path}: no such file or directory")
    try:
        if _is_array(path):
            with open(path, encoding="utf-8") as file:
                records = json.load(file)
            return records[0] if records and isinstance(records[0], dict) else {}
        line = next(_record_lines(path), b"{}")
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise JftError(f"{path}: not valid JSON ({error}); give a .jsonl, .json, .csv or "
                       ".parquet file, or a datasets folder") from None
    return record if isinstance(record, dict) else {}
