"""SFT data: read examples, tokenize them with loss masks, batch them into fixed shapes.

The pipeline, which `make_batcher` runs from a `DataConfig`:

    load_examples(path, format)            -> datasets.Dataset (memory-mapped) or IterableDataset
    tokenize_examples(examples, tok, cfg)  -> TokenizedExamples, or a TokenizedStream when streaming
    Batcher(tokenized, batch_size, ...)    -> an endless, deterministic, resumable batch iterator

Batches are dicts of numpy arrays, each [batch_size, max_length]:

- `tokens` int32: token ids; padding holds `pad_id`.
- `segment_ids` int32: 1, 2, ... for the examples of a row, 0 for padding.
- `positions` int32: 0, 1, ... restarting at every example.
- `loss_mask` bool: True where tokens[b, t] is a training target. The model predicts tokens[:, t]
  from positions < t of the same segment, so the first token of an example is never a target.

Formats (the fields each record needs):

- `text` (`text`): BOS when the tokenizer adds one, the text, EOS. Every token but the first is a
  target.
- `prompt_completion` (`prompt`, `completion`): prompt ids + completion ids + EOS, with the
  completion ids and EOS as targets. The prompt and the completion are encoded separately (as TRL
  does): the prompt ids are then exactly the ids generation is fed at inference (BOS when the
  tokenizer adds one, then the prompt text), so the completion is learned as the continuation of
  those very ids, and no BPE merge can straddle the boundary and blur which tokens are targets.
- `chat` (`messages`: a list of {"role", "content"} strings, or that list as a JSON string, as a
  CSV cell holds it): rendered by the tokenizer's chat template. Each assistant turn is located by
  rendering prefixes: messages[:i] with the generation prompt ends where turn i's tokens start,
  messages[:i + 1] ends after the turn. The text is cut at those points and each piece encoded on
  its own, so the mask is exact for any template that renders prefixes as prefixes. A turn's
  targets run through its last EOS / end-of-turn token (ChatML's <|im_end|>, Gemma's
  <end_of_turn>); the template's text after it (a newline) is not a target. A template that ends a
  turn with no such token gets EOS appended to the turn. Every role must be one the template knows
  (`jft.text.chat_template.template_roles`).

- `preference` (`prompt`, `chosen`, `rejected`) and `kto` (`prompt`, `completion`, `label`): each
  example is two sequences, tokenized into `PairedExamples` by `jft.training.preference_data`
  and batched as [first; second] halves packed alike.

With `completion_only_loss=False` every token but an example's first is a target, in the first
three formats.

Batching: examples are shuffled by (seed, epoch) and taken in windows of `window` examples. With
packing, each window is packed by first-fit decreasing into rows of max_length (no example is ever
split across rows) and the rows are shuffled. Without packing, each row holds one example, and the
window's examples are sorted by length and cut into batches of similar lengths, whose order is
then shuffled. Overlong examples are truncated to their first max_length tokens or dropped. A
file whose examples would all be dropped, or all truncated to no target token, is refused; some
truncated to none, a warning (for a stream, as its first pass ends).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from jft.errors import JftError

if TYPE_CHECKING:
    from jft.text.tokenizer import Tokenizer

__all__ = [
    "Batcher",
    "DataConfig",
    "PairedExamples",
    "TokenizedExample",
    "TokenizedExamples",
    "TokenizedStream",
    "completion_reference",
    "exact_match",
    "load_examples",
    "batcher",
    "make_batcher",
    "read_split",
    "prompt_ids",
    "tokenize_example",
    "tokenize_examples",
]

DataFormat = Literal["text", "prompt_completion", "chat", "preference", "kto"]
Overlong = Literal["truncate", "drop"]
FORMATS = get_args(DataFormat)
OVERLONG = get_args(Overlong)
FIELDS = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "chat": ("messages",),
          "preference": ("prompt", "chosen", "rejected"), "kto": ("prompt", "completion", "label")}
PAIRED_FORMATS = ("preference", "kto")  # tokenized as PairedExamples (preference_data.py)
_NEEDS = {
    "text": 'a string field "text"',
    "prompt_completion": 'string fields "prompt" and "completion"',
    "chat": 'a field "messages": a list of {"role": string, "content": string} objects '
    'with at least one "assistant" message',
    "preference": 'fields "prompt", "chosen" and "rejected": strings, or a list of messages '
    '(prompt) and assistant messages or strings (chosen, rejected)',
    "kto": 'fields "prompt" and "completion" (strings, or messages and assistant messages) and '
    'a boolean "label" (true: desirable)',
}
_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
_KINDS = "a .jsonl, .json, .parquet or .csv file, or a folder written by datasets' save_to_disk"
_STATE_VERSION = 1
_COUNTERS = ("examples", "tokens", "targets", "truncated", "dropped")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The `data` section of a training config (docs/config.md), and the settings of the
    functions below. Bad values raise `JftError` naming the key; `jft.training.config` reads the
    field metadata (`required`, `min`) to report them against the config file."""

    # A .jsonl/.json/.parquet/.csv file, or a saved `datasets` folder (save_to_disk).
    train: str = dataclasses.field(metadata={"required": True})
    eval: str | None = None
    format: DataFormat = "prompt_completion"
    max_length: int = dataclasses.field(default=512, metadata={"min": 1})  # 2 with packing
    packing: bool = True
    completion_only_loss: bool = True  # loss on completion / assistant tokens only
    overlong: Overlong = "truncate"
    streaming: bool = False  # read lazily with datasets streaming, for files too big to convert

    def __post_init__(self):
        for key in ("train", "eval"):
            value = getattr(self, key)
            if not (value is None and key == "eval") and not (
                isinstance(value, str | os.PathLike) and str(value)
            ):
                raise JftError(f"data.{key}={value!r}; expected a path to {_KINDS}")
        _check_choice("data.format", self.format, FORMATS)
        _check_choice("data.overlong", self.overlong, OVERLONG)
        least = 2 if self.packing is True else 1  # a packed row holds an input and a target
        if not _is_int(self.max_length) or self.max_length < least:
            raise JftError(f"data.max_length={self.max_length!r}; expected an integer >= "
                           f"{least}{' with data.packing' if least == 2 else ''}")
        for key in ("packing", "completion_only_loss", "streaming"):
            if not isinstance(getattr(self, key), bool):
                raise JftError(f"data.{key}={getattr(self, key)!r}; expected true or false")
        if self.streaming and self.format in PAIRED_FORMATS:
            raise JftError(f"data.streaming is not available for format {self.format} (its "
                           "examples are paired when tokenized); set data.streaming to false")


@dataclass(frozen=True)
class TokenizedExample:
    """One example's token ids, and for each token whether it is a training target;
    `fields`: further per-token values an objective reads (KTO's label), batched under
    their names."""

    tokens: list[int]
    loss_mask: list[bool]
    fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Reading


def load_examples(
    path: str | os.PathLike,
    format: str,
    *,
    streaming: bool = False,
    cache_dir: str | None = None,
) -> Any:
    """The records of a data file or saved dataset, checked against `format`.

    Returns a `datasets.Dataset` (memory-mapped Arrow, converted once into datasets' cache, or
    `cache_dir`), or with `streaming` a `datasets.IterableDataset` read lazily. Every record is
    checked up front; a streamed one as it is read (the first one up front). Errors name the
    file, the 1-based line (JSON lines), the 0-based record index and the field.
    """
    _check_choice("format", format, FORMATS)
    with _no_progress_bars():
        return _load_examples(Path(path), format, streaming, cache_dir)


def _load_examples(path: Path, format: str, streaming: bool, cache_dir: str | None) -> Any:
    if path.is_dir():
        return _load_saved(path, format, streaming)
    if not path.is_file():
        raise JftError(f"{path}: no such file or directory; expected {_KINDS}")
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise JftError(
            f"{path}: unsupported file type {suffix or '(no suffix)'!r}; expected {_KINDS}"
        )
    if path.stat().st_size == 0:
        raise _empty(path)
    if suffix in (".jsonl", ".json"):
        return _load_json(path, format, streaming, cache_dir)
    if suffix == ".csv":
        return _load_csv(path, format, streaming, cache_dir)
    return _load_parquet(path, format, streaming, cache_dir)


def _load_json(path: Path, format: str, streaming: bool, cache_dir: str | None) -> Any:
    import datasets

    if streaming:
        stream = datasets.IterableDataset.from_generator(
            _json_records, gen_kwargs={"path": str(path), "format": format}
        )
        if _first(stream) is None:
            raise _empty(path)
        return stream
    # datasets' own JSON reader accepts lines that are not objects and names no line, so every
    # line is checked here first; the conversion to Arrow then cannot fail on the data.
    if sum(1 for _ in _json_records(str(path), format)) == 0:
        raise _empty(path)
    return _datasets_call(
        path,
        lambda: datasets.load_dataset(
            "json", data_files=str(path), split="train", cache_dir=cache_dir
        ),
    )


def _json_records(path: str, format: str) -> Iterator[dict]:
    """The records of a JSON-lines file or of a JSON array, each checked for `format`."""
    with open(path, "rb") as file:
        is_array = _first_byte(file) == b"["
        file.seek(0)
        if is_array:
            yield from _json_array(path, file, format)
            return
        index = 0
        for line_number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise JftError(
                    f"{path}: line {line_number} is not valid JSON ({error.msg} at column "
                    f"{error.colno}); expected one JSON object per line"
                ) from None
            except UnicodeDecodeError:
                raise JftError(f"{path}: line {line_number} is not valid UTF-8") from None
            where = f"{path}: line {line_number} (record {index})"
            if not isinstance(record, dict):
                raise JftError(
                    f"{where} is a JSON {_json_type(record)}; expected one JSON object per line"
                )
            _check_record(record, format, where)
            yield record
            index += 1


def _json_array(path: str, file, format: str) -> Iterator[dict]:
    try:
        records = json.load(file)
    except json.JSONDecodeError as error:
        raise JftError(
            f"{path}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno}); "
            "expected a JSON array of objects or one JSON object per line"
        ) from None
    except UnicodeDecodeError:
        raise JftError(f"{path}: not valid UTF-8") from None
    for index, record in enumerate(records):
        where = f"{path}: record {index}"
        if not isinstance(record, dict):
            raise JftError(f"{where} is a JSON {_json_type(record)}; expected an object")
        _check_record(record, format, where)
        yield record


def _first_byte(file) -> bytes:
    while chunk := file.read(4096):
        stripped = chunk.lstrip()
        if stripped:
            return stripped[:1]
    return b""


def _load_csv(path: Path, format: str, streaming: bool, cache_dir: str | None) -> Any:
    import datasets

    try:
        with open(path, newline="", encoding="utf-8") as file:
            reader = csv.reader(file)
            header, first_row = next(reader, None), next(reader, None)
    except UnicodeDecodeError:
        raise JftError(f"{path}: not valid UTF-8") from None
    except csv.Error as error:
        raise JftError(f"{path}: not a valid CSV file ({error})") from None
    if not header or first_row is None:
        raise _empty(path)
    # Every column is read as text: no number guessing, and an empty cell is "", not missing.
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return _load_with_datasets(
        path, "csv", format, streaming, cache_dir, features=features, keep_default_na=False
    )


def _load_parquet(path: Path, format: str, streaming: bool, cache_dir: str | None) -> Any:
    import pyarrow.parquet as pq

    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... for a bad file
        raise JftError(f"{path}: not a valid Parquet file ({_one_line(error)})") from None
    if rows == 0:
        raise _empty(path)
    return _load_with_datasets(path, "parquet", format, streaming, cache_dir)


def _load_with_datasets(
    path: Path, builder: str, format: str, streaming: bool, cache_dir: str | None, **kwargs
) -> Any:
    import datasets

    examples = _datasets_call(
        path,
        lambda: datasets.load_dataset(
            builder,
            data_files=str(path),
            split="train",
            cache_dir=cache_dir,
            streaming=streaming,
            **kwargs,
        ),
    )
    return _checked(examples, format, str(path))


def _load_saved(path: Path, format: str, streaming: bool) -> Any:
    import datasets

    try:
        examples = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise JftError(
            f"{path}: a folder, but not one written by datasets' save_to_disk "
            f"(no dataset_info.json and state.json); expected {_KINDS}"
        ) from None
    if isinstance(examples, datasets.DatasetDict):
        if len(examples) != 1:
            raise JftError(
                f"{path}: holds the splits {', '.join(examples)}; give one split's folder, "
                f"such as {path / next(iter(examples))}"
            )
        examples = next(iter(examples.values()))
    if streaming:
        examples = examples.to_iterable_dataset()
    return _checked(examples, format, str(path))


def _checked(examples: Any, format: str, source: str) -> Any:
    """Checks a Dataset's records now; an IterableDataset's first now and the rest when read."""
    import datasets

    if isinstance(examples, datasets.IterableDataset):
        first = _first(examples)
        if first is None:
            raise _empty(source)
        _check_record(first, format, f"{source}: record 0", columns=list(first))
        return examples.map(_RecordCheck(format, source), with_indices=True)
    if len(examples) == 0:
        raise _empty(source)
    fields = FIELDS[format]
    columns = examples.column_names
    for field in fields:
        if field not in columns:
            raise JftError(
                f'{source}: record 0: missing field "{field}" (its fields: '
                f"{', '.join(columns)}); format {format!r} needs {_NEEDS[format]}"
            )
    index = 0
    for batch in examples.select_columns(list(fields)).iter(batch_size=1024):
        for values in zip(*(batch[field] for field in fields), strict=True):
            record = dict(zip(fields, values, strict=True))
            _check_record(record, format, f"{source}: record {index}")
            index += 1
    return examples


class _RecordCheck:
    """datasets.IterableDataset.map function that checks each record as it streams by."""

    def __init__(self, format: str, source: str):
        self.format = format
        self.source = source

    def __call__(self, record: dict, index: int) -> dict:
        _check_record(record, self.format, f"{self.source}: record {index}")
        return {}


def _first(examples: Iterable) -> Any:
    return next(iter(examples), None)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """datasets' progress bars ("Generating train split") off while it reads, then as before:
    on screen they would come between the status lines and any error found in the data."""
    import datasets

    # HF_DATASETS_DISABLE_PROGRESS_BARS=0 asks for bars; datasets then refuses, with a warning.
    asked_for = datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is False
    if asked_for or datasets.are_progress_bars_disabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


def _datasets_call(path: Path, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except JftError:
        raise
    except Exception as error:  # datasets and pyarrow raise many kinds for an unreadable file
        cause = error.__cause__ or error
        raise JftError(f"{path}: datasets could not read it ({_one_line(cause)})") from error


def _empty(path: Path | str) -> JftError:
    return JftError(f"{path}: empty, it holds no records; expected {_KINDS} with records")


# ---------------------------------------------------------------------------------------------
# Checking records


def _check_record(
    record: Mapping, format: str, where: str, columns: Sequence[str] | None = None
) -> None:
    problem = _record_problem(record, format)
    if problem is not None:
        found = f" (its fields: {', '.join(map(str, columns))})" if columns is not None else ""
        raise JftError(f"{where}: {problem}{found}; format {format!r} needs {_NEEDS[format]}")


def _record_problem(record: Mapping, format: str) -> str | None:
    for field in FIELDS[format]:
        if record.get(field) is None:
            return f'missing field "{field}"'
    if format in PAIRED_FORMATS:
        from jft.training.preference_data import record_problem

        return record_problem(record, format)
    if format == "chat":
        messages = _parse_messages(record["messages"])
        return messages if isinstance(messages, str) else None
    for field in FIELDS[format]:
        if not isinstance(record[field], str):
            return f'field "{field}" is {_json_type(record[field])}, not a string'
    return None


def _parse_messages(value: Any, field: str = "messages", need_assistant: bool = True
                    ) -> list[dict] | str:
    """The messages as a list of dicts, or a description of what is wrong with them."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return f'field "{field}" is a string that is not a JSON list'
    if not isinstance(value, list | tuple) or not value:
        return f'field "{field}" is {_json_type(value)}, not a non-empty list'
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, Mapping):
            return f'"{field}"[{index}] is {_json_type(message)}, not an object'
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                return f'"{field}"[{index}] has no string "{key}"'
        messages.append({key: item for key, item in message.items() if item is not None})
    if need_assistant and not any(message["role"] == "assistant" for message in messages):
        of = "" if field == "messages" else f' of "{field}"'
        return f'no message{of} has role "assistant", so there is nothing to learn'
    return messages


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


# ---------------------------------------------------------------------------------------------
# Tokenizing


def tokenize_example(
    example: Mapping, tokenizer: Tokenizer, config: DataConfig, *, where: str = "example"
) -> TokenizedExample:
    """Token ids and loss mask of one record; see the module docstring for each format.

    `where` starts the message of any error (such as "train.jsonl: record 7").
    """
    format = config.format
    _check_record(example, format, where)
    if tokenizer.eos_id is None:
        raise JftError("the tokenizer has no EOS token, which every example must end with")
    eos = tokenizer.eos_id
    if format == "text":
        tokens = prompt_ids(tokenizer, example["text"]) + [eos]
        mask = [True] * len(tokens)
    elif format == "prompt_completion":
        prompt = prompt_ids(tokenizer, example["prompt"])
        completion = tokenizer.encode(example["completion"], add_special_tokens=False) + [eos]
        tokens = prompt + completion
        mask = [not config.completion_only_loss] * len(prompt) + [True] * len(completion)
    else:
        messages = _parse_messages(example["messages"])
        _check_roles(messages, tokenizer, where)
        tokens, mask = _chat_tokens(messages, tokenizer, where)
        if not config.completion_only_loss:
            mask = [True] * len(tokens)
    mask[0] = False
    return TokenizedExample(tokens, mask)


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """What generation is fed for a plain prompt: BOS when the tokenizer adds one, then the text.

    Any EOS a tokenizer's post-processor would append is left out.
    """
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    return bos + tokenizer.encode(prompt, add_special_tokens=False)


def _check_roles(messages: list[dict], tokenizer: Tokenizer, where: str,
                 field: str = "messages") -> None:
    """Refuses a role the chat template does not know, which it would render as plain text or
    drop: most likely a typo in the data (see `template_roles`)."""
    if tokenizer.chat_template is None:
        return  # rendering says that the checkpoint has no template
    from jft.text.chat_template import template_roles

    roles = template_roles(tokenizer.chat_template)
    for index, message in enumerate(messages):
        if message["role"] not in roles:
            source = tokenizer.chat_template_source
            template = f"the chat template ({source})" if source else "the chat template"
            raise JftError(
                f'{where}: "{field}"[{index}] has role "{message["role"]}", which {template} '
                f"does not know; valid roles: {', '.join(sorted(roles))}"
            )


def _chat_tokens(
    messages: list[dict], tokenizer: Tokenizer, where: str, first_target: int = 0
) -> tuple[list[int], list[bool]]:
    """Token ids and target mask of a conversation: its assistant turns from message
    `first_target` on are the targets."""
    def render(upto: int, generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(messages[:upto], generation_prompt)
        except JftError as error:
            raise JftError(f"{where}: {error}") from None

    full = render(len(messages), False)
    turns = []  # (start, end) character spans of the assistant turns in `full`
    end = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or index < first_target:
            continue
        before = render(index, True)
        through = render(index + 1, False)
        if not (len(before) >= end and through.startswith(before) and full.startswith(through)):
            raise JftError(
                f"{where}: the chat template does not render messages[:{index}] (with the "
                f"generation prompt) and messages[:{index + 1}] as prefixes of the whole "
                f"conversation, so assistant message {index} cannot be located; chat data needs "
                "a template that renders a conversation turn by turn"
            )
        turns.append((len(before), len(through)))
        end = len(through)

    stops = set(tokenizer.stop_ids)
    tokens: list[int] = []
    mask: list[bool] = []

    def add(ids: list[int], target: bool) -> None:
        tokens.extend(ids)
        mask.extend([target] * len(ids))

    done = 0
    for start, stop in turns:
        add(tokenizer.encode(full[done:start], add_special_tokens=False), False)
        turn = tokenizer.encode(full[start:stop], add_special_tokens=False)
        ends = [i for i, token in enumerate(turn) if token in stops]
        if ends:
            add(turn[: ends[-1] + 1], True)
            add(turn[ends[-1] + 1 :], False)
        else:
            add([*turn, tokenizer.eos_id], True)
        done = stop
    add(tokenizer.encode(full[done:], add_special_tokens=False), False)
    return tokens, mask


class TokenizedExamples(Sequence):
    """Tokenized examples held compactly: all tokens in one int32 array, masks in one bool array,
    each per-token field in one array of its own.

    Item i is a `TokenizedExample`; `arrays(i)` gives its tokens and mask as numpy views.
    """

    def __init__(self, tokens: np.ndarray, loss_mask: np.ndarray, offsets: np.ndarray,
                 fields: Mapping[str, np.ndarray] | None = None):
        self.tokens = np.asarray(tokens, np.int32)
        self.loss_mask = np.asarray(loss_mask, np.bool_)
        self.offsets = np.asarray(offsets, np.int64)
        self.lengths = np.diff(self.offsets)
        self.fields = {name: np.asarray(values) for name, values in (fields or {}).items()}

    @classmethod
    def from_examples(cls, examples: Iterable[TokenizedExample]) -> TokenizedExamples:
        tokens, masks, offsets, fields = [], [], [0], {}
        for example in examples:
            tokens.append(np.asarray(example.tokens, np.int32))
            masks.append(np.asarray(example.loss_mask, np.bool_))
            offsets.append(offsets[-1] + len(example.tokens))
            for name, values in example.fields.items():
                fields.setdefault(name, []).append(np.asarray(values))
        if not tokens:
            return cls(np.zeros(0, np.int32), np.zeros(0, np.bool_), np.zeros(1, np.int64))
        return cls(np.concatenate(tokens), np.concatenate(masks), np.asarray(offsets),
                   {name: np.concatenate(parts) for name, parts in fields.items()})

    def with_field(self, name: str, values: np.ndarray) -> TokenizedExamples:
        """The same examples with one more per-token field (values aligned with `tokens`)."""
        if len(values) != len(self.tokens):
            raise ValueError(f"field {name!r} has {len(values)} values for {len(self.tokens)} "
                             "tokens")
        return TokenizedExamples(self.tokens, self.loss_mask, self.offsets,
                                 {**self.fields, name: values})

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        tokens, mask, fields = self.sequence(index)
        return TokenizedExample(tokens.tolist(), mask.tolist(),
                                {name: values.tolist() for name, values in fields.items()})

    def arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.sequence(index)[:2]

    def sequence(self, index: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """(tokens, loss mask, per-token fields) of example `index`, as numpy views."""
        index = range(len(self))[index]  # bounds check and negative indices
        start, end = self.offsets[index], self.offsets[index + 1]
        return (self.tokens[start:end], self.loss_mask[start:end],
                {name: values[start:end] for name, values in self.fields.items()})


@dataclass(frozen=True)
class PairedExamples:
    """Examples of two sequences each, batched as [all first; all second] with the same
    packing (`jft.objectives.sequences`): preference pairs (chosen, rejected), or KTO's
    examples and their mismatched KL sequences."""

    first: TokenizedExamples
    second: TokenizedExamples

    def __post_init__(self):
        if len(self.first) != len(self.second):
            raise ValueError("paired examples need as many second sequences as first ones")

    def __len__(self) -> int:
        return len(self.first)


class TokenizedStream:
    """Streamed examples, tokenized as they are read; re-iterable from any record."""

    def __init__(self, examples: Any, tokenizer: Tokenizer, config: DataConfig, source: str):
        self.examples = examples
        self.tokenizer = tokenizer
        self.config = config
        self.source = source
        self._fit_checked = False

    def iter_from(self, start: int) -> Iterator[TokenizedExample]:
        """The tokenized records from record `start` on; skipped records are not tokenized.

        The first whole pass also checks how the records fit `data.max_length` (`_Fit`), as it
        ends: a stream is not read twice.
        """
        fit = _Fit() if start == 0 and not self._fit_checked else None
        for index, example in enumerate(_skip(self.examples, start), start):
            tokenized = tokenize_example(
                example, self.tokenizer, self.config, where=f"{self.source}: record {index}"
            )
            if fit is not None:
                fit.add(tokenized, self.config.max_length)
            yield tokenized
        if fit is not None:
            self._fit_checked = True
            fit.check(self.config, self.source)

    def __iter__(self) -> Iterator[TokenizedExample]:
        return self.iter_from(0)


def tokenize_examples(
    examples: Any, tokenizer: Tokenizer, config: DataConfig, *, source: str = "data"
) -> TokenizedExamples | TokenizedStream | PairedExamples:
    """Tokenizes records (a Dataset or a list of dicts) now, or an IterableDataset lazily;
    preference and KTO records into `PairedExamples`."""
    datasets = sys.modules.get("datasets")
    if datasets is not None and isinstance(examples, datasets.IterableDataset):
        return TokenizedStream(examples, tokenizer, config, source)
    if datasets is not None and isinstance(examples, datasets.Dataset):
        examples = examples.select_columns(list(FIELDS[config.format]))
    if config.format in PAIRED_FORMATS:
        from jft.training.preference_data import tokenize_pairs

        paired = tokenize_pairs(examples, tokenizer, config, source)
        _Fit.of_pairs(paired, config.max_length).check(config, source)
        return paired
    tokenized = TokenizedExamples.from_examples(
        tokenize_example(example, tokenizer, config, where=f"{source}: record {index}")
        for index, example in enumerate(examples)
    )
    _Fit.of(tokenized, config.max_length).check(config, source)
    return tokenized


@dataclass
class _Fit:
    """How one file's examples fare at `data.max_length`: a file whose examples are all dropped,
    or all cut to no completion token (long prompts), would train on nothing, with a loss of 0."""

    examples: int = 0
    fitting: int = 0  # no longer than max_length
    emptied: int = 0  # longer, and no target token among their first max_length
    shortest: int | None = None

    @classmethod
    def of(cls, tokenized: TokenizedExamples, max_length: int) -> _Fit:
        lengths = tokenized.lengths
        kept = cls._kept_targets(tokenized, max_length)
        return cls(
            examples=len(lengths),
            fitting=int((lengths <= max_length).sum()),
            emptied=int(((lengths > max_length) & (kept == 0)).sum()),
            shortest=int(lengths.min()) if len(lengths) else None,
        )

    @classmethod
    def of_pairs(cls, paired: PairedExamples, max_length: int) -> _Fit:
        """A pair fits when both of its sequences do, and is emptied when either is."""
        halves = [cls._kept_targets(half, max_length) for half in (paired.first, paired.second)]
        lengths = np.maximum(paired.first.lengths, paired.second.lengths)
        emptied = [(half.lengths > max_length) & (kept == 0)
                   for half, kept in zip((paired.first, paired.second), halves, strict=True)]
        return cls(examples=len(lengths), fitting=int((lengths <= max_length).sum()),
                   emptied=int((emptied[0] | emptied[1]).sum()),
                   shortest=int(lengths.min()) if len(lengths) else None)

    @staticmethod
    def _kept_targets(tokenized: TokenizedExamples, max_length: int) -> np.ndarray:
        lengths, starts = tokenized.lengths, tokenized.offsets[:-1]
        targets = np.concatenate([[0], np.cumsum(tokenized.loss_mask, dtype=np.int64)])
        return targets[starts + np.minimum(lengths, max_length)] - targets[starts]

    def add(self, example: TokenizedExample, max_length: int) -> None:
        length = len(example.tokens)
        self.examples += 1
        self.fitting += length <= max_length
        self.emptied += length > max_length and not any(example.loss_mask[:max_length])
        self.shortest = length if self.shortest is None else min(self.shortest, length)

    def check(self, config: DataConfig, source: str) -> None:
        if self.examples == 0:
            return  # the Batcher reports that there is nothing to batch
        limit = f"data.max_length={config.max_length}"
        if config.overlong == "drop":
            if self.fitting == 0:
                raise JftError(
                    f"{source}: no example fits {limit} (the shortest has {self.shortest} "
                    "tokens) and data.overlong=drop drops them all; raise data.max_length or "
                    "set data.overlong to truncate"
                )
        elif self.emptied == self.examples:
            raise JftError(
                f"{source}: no example keeps a completion token within {limit} (the prompts "
                "fill it), so there is nothing to train on; raise data.max_length or shorten "
                "the prompts"
            )
        elif self.emptied:
            warnings.warn(
                f"{source}: {self.emptied} of {self.examples} examples keep no completion token "
                f"within {limit} (their prompts fill it) and train on nothing; raise "
                "data.max_length or shorten their prompts",
                stacklevel=2,
            )


def _skip(examples: Any, start: int) -> Iterable:
    if start == 0:
        return examples
    if hasattr(examples, "skip"):  # datasets.IterableDataset
        return examples.skip(start)
    return islice(examples, start, None)


# ---------------------------------------------------------------------------------------------
# Batching


class Batcher:
    """Fixed-shape training batches from tokenized examples: deterministic and resumable.

    examples: `TokenizedExamples` or any sequence of `TokenizedExample`s or of dicts with
    "tokens" and "loss_mask" (a `datasets.Dataset` with those columns too), or a re-iterable
    stream of them (`TokenizedStream`, `datasets.IterableDataset`), read a window at a time.
    The same arguments give the same batches. `epochs=None` repeats the data forever; with a
    number, iteration stops after that many passes, the last batch padded with empty rows (or
    left out with `drop_remainder`). `shuffle=False` keeps the data's order (for evaluation).
    `state()` after any batch, given to `restore` of a Batcher made with the same arguments,
    continues with exactly the batches that would have followed.

    counters: examples, tokens (not padding) and targets (loss-mask tokens) in the batches given
    so far; truncated examples among them; dropped examples (overlong with overlong="drop", or
    empty) met so far.
    """

    def __init__(
        self,
        examples: Any,
        batch_size: int,
        max_length: int,
        packing: bool = True,
        seed: int = 0,
        *,
        shuffle: bool = True,
        epochs: int | None = None,
        drop_remainder: bool = False,
        overlong: str = "truncate",
        window: int = 1024,
        pad_id: int = 0,
    ):
        for name, value, least in (
            ("batch_size", batch_size, 1),
            ("max_length", max_length, 1),
            ("seed", seed, 0),
            ("window", window, 1),
            ("pad_id", pad_id, 0),
        ):
            if not _is_int(value) or value < least:
                raise JftError(f"{name}={value!r}; expected an integer >= {least}")
        if epochs is not None and (not _is_int(epochs) or epochs < 1):
            raise JftError(f"epochs={epochs!r}; expected an integer >= 1, or None for no end")
        _check_choice("overlong", overlong, OVERLONG)
        self.batch_size = batch_size
        self.max_length = max_length
        self.packing = bool(packing)
        self.seed = seed
        self.shuffle = bool(shuffle)
        self.epochs = epochs
        self.drop_remainder = bool(drop_remainder)
        self.overlong = overlong
        self.pad_id = pad_id
        # Without packing a window holds whole batches, so length buckets fill batches.
        self.window = window if packing else math.ceil(window / batch_size) * batch_size
        self._source = _as_source(examples)
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._items: list[tuple[np.ndarray, np.ndarray]] = []  # the current window's (streams)
        self._stream: Iterator | None = None
        self._stream_at: tuple[int, int] | None = None  # (epoch, window) _stream reads next
        if self._source.lengths is not None:
            self._check_some_fit(self._source.lengths)
        self.counters = dict.fromkeys(_COUNTERS, 0)
        self._epoch = self._window = self._row = 0
        self._done = False
        self._rows: list[list[int]] = []
        self._epoch_had_rows = False
        self._advance()

    @property
    def epoch(self) -> int:
        """The epoch the next batch starts in."""
        return self._epoch

    def __iter__(self) -> Batcher:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        while len(rows) < self.batch_size and not self._done:
            # Fetched now: a stream's next window replaces the examples the keys point into.
            rows.append([self._example(key) for key in self._rows[self._row]])
            self._row += 1
            if self._row == len(self._rows):
                self._window += 1
                self._advance()
        if not rows or (len(rows) < self.batch_size and self.drop_remainder):
            raise StopIteration
        return self._assemble(rows)

    def state(self) -> dict:
        """JSON-serialisable position and counters; `restore` continues from here."""
        return {
            "version": _STATE_VERSION,
            "epoch": self._epoch,
            "window": self._window,
            "row": self._row,
            "done": self._done,
            "counters": {key: int(value) for key, value in self.counters.items()},
            "settings": self._settings(),
        }

    def restore(self, state: Mapping) -> None:
        """Continues from `state()` of a Batcher made with the same data and arguments."""
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise JftError(
                f"data state: expected a Batcher.state() dict with version {_STATE_VERSION}"
            )
        saved = state.get("settings", {})
        for key, value in self._settings().items():
            if saved.get(key) != value:
                raise JftError(
                    f"data state: it was saved with {key}={saved.get(key)!r}, this run has "
                    f"{key}={value!r}; resume with the same data and data settings"
                )
        self.counters = {key: int(state["counters"][key]) for key in _COUNTERS}
        self._epoch, self._window, self._row = state["epoch"], state["window"], state["row"]
        self._done = bool(state["done"])
        if self._done:
            return
        planned = self._plan(self._epoch, self._window)
        if planned is None or not 0 <= self._row < len(planned[0]):
            raise JftError(
                "data state: its position is past the end of this data; resume with the same data"
            )
        self._rows = planned[0]
        self._epoch_had_rows = True

    # -- internals ------------------------------------------------------------------------------

    def _settings(self) -> dict:
        return {
            "examples": self._source.count,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "packing": self.packing,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epochs": self.epochs,
            "overlong": self.overlong,
            "window": self.window,
        }

    def _check_some_fit(self, lengths: np.ndarray) -> None:
        if len(lengths) == 0:
            raise JftError("no examples to batch")
        if not self._kept(lengths).any():
            raise JftError(
                f"no example fits max_length={self.max_length} (the shortest has "
                f"{int(lengths.min())} tokens) and overlong='drop' drops them all; "
                "raise max_length or use overlong='truncate'"
            )

    def _kept(self, lengths: np.ndarray) -> np.ndarray:
        fits = lengths <= self.max_length if self.overlong == "drop" else True
        return (lengths > 0) & fits

    def _advance(self) -> None:
        """Moves to the first window from (epoch, window) on with rows, or to the end."""
        while not self._done:
            planned = self._plan(self._epoch, self._window)
            if planned is None:  # past the epoch's last window
                if not self._epoch_had_rows:
                    raise JftError(
                        f"no example fits max_length={self.max_length} and overlong='drop' "
                        "drops them all; raise max_length or use overlong='truncate'"
                    )
                self._epoch += 1
                self._window = 0
                self._epoch_had_rows = False
                self._done = self.epochs is not None and self._epoch >= self.epochs
                continue
            rows, dropped = planned
            self.counters["dropped"] += dropped
            if rows:
                self._rows, self._row = rows, 0
                self._epoch_had_rows = True
                return
            self._window += 1

    def _plan(self, epoch: int, window: int) -> tuple[list[list[int]], int] | None:
        """The rows of one window (lists of example keys) and how many it drops; None past the
        epoch's end."""
        source = self._source
        start = window * self.window
        if source.lengths is not None:
            if start >= len(source.lengths):
                return None
            keys = self._order(epoch)[start : start + self.window]
            lengths = source.lengths[keys]
        else:
            if self._stream_at != (epoch, window):
                self._stream = iter(source.iter_from(start))
            items = [_as_item(item) for item in islice(self._stream, self.window)]
            self._stream_at = (epoch, window + 1)
            if not items:
                return None
            self._items = items
            keys = np.arange(len(items))
            if self.shuffle:
                keys = self._rng(epoch, window, 0).permutation(keys)
            lengths = np.array([_item_length(items[k]) for k in keys], np.int64)
        rng = self._rng(epoch, window, 1)
        kept = self._kept(lengths)
        dropped = int((~kept).sum())
        positions = np.flatnonzero(kept)
        sizes = np.minimum(lengths[positions], self.max_length)
        if self.packing:
            rows = [[positions[i] for i in row] for row in _first_fit(sizes, self.max_length)]
            if self.shuffle:
                rows = [rows[i] for i in rng.permutation(len(rows))]
        else:
            by_length = positions[np.argsort(sizes, kind="stable")]
            groups = [
                by_length[i : i + self.batch_size]
                for i in range(0, len(by_length), self.batch_size)
            ]
            if self.shuffle:
                groups = [groups[i] for i in rng.permutation(len(groups))]
            rows = [[position] for group in groups for position in group]
        return [[int(keys[p]) for p in row] for row in rows], dropped

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            count = len(self._source.lengths)
            order = (
                np.random.default_rng([self.seed, epoch]).permutation(count)
                if self.shuffle
                else np.arange(count)
            )
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _rng(self, epoch: int, window: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, window, stream])

    def _example(self, key: int) -> tuple:
        if self._source.lengths is None:
            return self._items[key]
        return self._source.get(key)

    def _assemble(self, rows: list[list[tuple]]) -> dict:
        """The batch of `rows` (lists of items): one block of batch_size rows per sequence
        of an item ([first; second] for paired examples), packed alike."""
        arity = len(rows[0][0])
        shape = (arity * self.batch_size, self.max_length)
        tokens = np.full(shape, self.pad_id, np.int32)
        segment_ids = np.zeros(shape, np.int32)
        positions = np.zeros(shape, np.int32)
        loss_mask = np.zeros(shape, np.bool_)
        fields = {name: np.zeros(shape, np.asarray(values).dtype)
                  for sequence in rows[0][0] for name, values in sequence[2].items()}
        counters = self.counters
        for b, row in enumerate(rows):
            columns = [0] * arity
            for segment, item in enumerate(row, 1):
                counters["examples"] += 1
                counters["truncated"] += _item_length(item) > self.max_length
                for half, (example_tokens, example_mask, example_fields) in enumerate(item):
                    r, column = half * self.batch_size + b, columns[half]
                    n = min(len(example_tokens), self.max_length)
                    span = slice(column, column + n)
                    tokens[r, span] = example_tokens[:n]
                    segment_ids[r, span] = segment
                    positions[r, span] = np.arange(n)
                    loss_mask[r, span] = example_mask[:n]
                    loss_mask[r, column] = False
                    for name, values in example_fields.items():
                        fields[name][r, span] = values[:n]
                    counters["tokens"] += n
                    counters["targets"] += int(loss_mask[r, span].sum())
                    columns[half] += n
        return {
            "tokens": tokens,
            "segment_ids": segment_ids,
            "positions": positions,
            "loss_mask": loss_mask,
            **fields,
        }


def _first_fit(sizes: np.ndarray, capacity: int) -> list[list[int]]:
    """First-fit decreasing: rows of indices into `sizes`, each summing to at most capacity."""
    order = np.argsort(-sizes, kind="stable")
    space = np.empty(len(sizes), np.int64)
    rows: list[list[int]] = []
    for index in order:
        size = sizes[index]
        fits = np.flatnonzero(space[: len(rows)] >= size)
        if len(fits):
            rows[fits[0]].append(int(index))
            space[fits[0]] -= size
        else:
            space[len(rows)] = capacity - size
            rows.append([int(index)])
    return rows


def _as_item(item: Any) -> tuple:
    """An example as a tuple of its sequences, each (tokens, loss mask, fields)."""
    if isinstance(item, tuple) and item and isinstance(item[0], tuple):
        return item  # already one (a paired source's)
    return (_as_arrays(item),)


def _item_length(item: tuple) -> int:
    return max(len(sequence[0]) for sequence in item)


def _as_arrays(item: Any) -> tuple[np.ndarray, np.ndarray, dict]:
    fields = {}
    if isinstance(item, TokenizedExample):
        tokens, mask, fields = item.tokens, item.loss_mask, item.fields
    elif isinstance(item, Mapping) and "tokens" in item:
        tokens, mask = item["tokens"], item.get("loss_mask")
    else:
        raise TypeError(
            "Batcher examples must be TokenizedExamples or dicts with 'tokens' and 'loss_mask', "
            f"got {type(item).__name__}"
        )
    tokens = np.asarray(tokens, np.int32).reshape(-1)
    if mask is None:
        mask = np.ones(len(tokens), np.bool_)
    mask = np.asarray(mask, np.bool_).reshape(-1)
    if mask.shape != tokens.shape:
        raise JftError(
            f"an example has {len(tokens)} tokens but a loss_mask of {len(mask)}; they must match"
        )
    return tokens, mask, {name: np.asarray(values) for name, values in fields.items()}


class _Source:
    """Random access (lengths known, `get(key)`) or a stream (lengths None, `iter_from`)."""

    lengths: np.ndarray | None = None
    count: int | None = None

    def get(self, key: int) -> tuple:
        """The example's sequences, each (tokens, loss mask, per-token fields)."""
        raise NotImplementedError

    def iter_from(self, start: int) -> Iterable:
        raise NotImplementedError


class _ArraySource(_Source):
    def __init__(self, examples: TokenizedExamples):
        self.examples = examples
        self.lengths = examples.lengths
        self.count = len(examples)

    def get(self, key: int) -> tuple:
        return (self.examples.sequence(key),)


class _PairedSource(_Source):
    def __init__(self, examples: PairedExamples):
        self.examples = examples
        self.lengths = np.maximum(examples.first.lengths, examples.second.lengths)
        self.count = len(examples)

    def get(self, key: int) -> tuple:
        return self.examples.first.sequence(key), self.examples.second.sequence(key)


class _SequenceSource(_Source):
    def __init__(self, examples: Sequence, lengths: np.ndarray):
        self.examples = examples
        self.lengths = lengths
        self.count = len(examples)

    def get(self, key: int) -> tuple:
        return _as_item(self.examples[key])


class _StreamSource(_Source):
    def __init__(self, examples: Any):
        self.examples = examples

    def iter_from(self, start: int) -> Iterable:
        if hasattr(self.examples, "iter_from"):
            return self.examples.iter_from(start)
        return _skip(self.examples, start)


def _as_source(examples: Any) -> _Source:
    if isinstance(examples, TokenizedExamples):
        return _ArraySource(examples)
    if isinstance(examples, PairedExamples):
        return _PairedSource(examples)
    if isinstance(examples, TokenizedStream):
        return _StreamSource(examples)
    datasets = sys.modules.get("datasets")
    if datasets is not None and isinstance(examples, datasets.IterableDataset):
        return _StreamSource(examples)
    if datasets is not None and isinstance(examples, datasets.Dataset):
        return _SequenceSource(examples, _dataset_lengths(examples))
    if isinstance(examples, Sequence):
        lengths = np.array([_item_length(_as_item(item)) for item in examples], np.int64)
        return _SequenceSource(examples, lengths)
    if isinstance(examples, Iterable) and iter(examples) is not examples:
        return _StreamSource(examples)
    raise TypeError(
        "Batcher examples must be a sequence (list, TokenizedExamples, datasets.Dataset) or a "
        f"re-iterable stream (TokenizedStream, datasets.IterableDataset), got "
        f"{type(examples).__name__}"
    )


def _dataset_lengths(examples: Any) -> np.ndarray:
    import pyarrow.compute as pc

    if "tokens" not in examples.column_names:
        raise JftError(
            f"a Dataset given to Batcher needs a 'tokens' column, it has "
            f"{', '.join(examples.column_names)}; tokenize it first (tokenize_examples)"
        )
    tokens = examples.select_columns(["tokens"]).with_format("arrow")
    parts = [
        pc.list_value_length(batch["tokens"]).to_numpy(zero_copy_only=False)
        for batch in tokens.iter(batch_size=65536)
    ]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


# ---------------------------------------------------------------------------------------------
# Running it from a config, and evaluation


def read_split(
    config: DataConfig, tokenizer: Tokenizer, split: str = "train", *,
    cache_dir: str | None = None,
) -> tuple[Any, TokenizedExamples | TokenizedStream]:
    """`config.train` or `config.eval` read and tokenized once: (its records, for exact-match
    references; their tokens, for any number of `batcher`s)."""
    _check_choice("split", split, ("train", "eval"))
    path = config.train if split == "train" else config.eval
    if path is None:
        raise JftError("data.eval is not set; give an eval file to evaluate on")
    records = load_examples(path, config.format, streaming=config.streaming, cache_dir=cache_dir)
    return records, tokenize_examples(records, tokenizer, config, source=str(path))


def batcher(
    tokenized: Any, config: DataConfig, tokenizer: Tokenizer, batch_size: int, seed: int = 0,
    *, split: str = "train",
) -> Batcher:
    """Batches of a split's tokens: shuffled and endless for "train", in order and one pass
    (the last batch padded) for "eval"."""
    train = split == "train"
    return Batcher(
        tokenized,
        batch_size,
        config.max_length,
        config.packing,
        seed,
        shuffle=train,
        epochs=None if train else 1,
        overlong=config.overlong,
        pad_id=pad_id(tokenizer),
    )


def pad_id(tokenizer: Tokenizer) -> int:
    """What fills a batch's empty positions: the pad token, else EOS, else 0."""
    return next((i for i in (tokenizer.pad_id, tokenizer.eos_id) if i is not None), 0)


def make_batcher(
    config: DataConfig,
    tokenizer: Tokenizer,
    batch_size: int,
    seed: int = 0,
    *,
    split: str = "train",
    cache_dir: str | None = None,
) -> Batcher:
    """Reads, tokenizes and batches `config.train` (shuffled, endless) or `config.eval` (in
    order, one pass, the last batch padded): `read_split`, then `batcher`."""
    _, tokenized = read_split(config, tokenizer, split, cache_dir=cache_dir)
    return batcher(tokenized, config, tokenizer, batch_size, seed, split=split)


def completion_reference(
    example: Mapping, format: str, tokenizer: Tokenizer | None = None
) -> tuple[Any, str]:
    """What to generate from, and the text an exact match compares the generation with.

    prompt_completion: (prompt, completion); chat: (the messages before the last assistant
    message, that message's content). With a tokenizer, the first item is instead the prompt ids
    generation is fed: `prompt_ids` of the prompt, or the messages rendered with the generation
    prompt and encoded, the ids training saw before that turn.
    """
    _check_choice("format", format, FORMATS)
    if format == "text":
        raise JftError(
            "exact-match evaluation needs a reference answer; format 'text' has none, use "
            "'prompt_completion' or 'chat'"
        )
    if format == "kto":
        raise JftError("exact-match evaluation needs a reference answer; format 'kto' marks "
                       "completions desirable or not, use 'preference' or 'prompt_completion'")
    _check_record(example, format, "example")
    if format == "preference":  # the chosen completion is the reference
        from jft.training.preference_data import prompt_and_reference

        return prompt_and_reference(example, tokenizer)
    if format == "prompt_completion":
        prompt, reference = example["prompt"], example["completion"]
        if tokenizer is None:
            return prompt, reference
        return prompt_ids(tokenizer, prompt), reference
    messages = _parse_messages(example["messages"])
    last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
    context, reference = messages[:last], messages[last]["content"]
    if tokenizer is None:
        return context, reference
    text = tokenizer.apply_chat_template(context, add_generation_prompt=True)
    # The template writes BOS itself where the model wants one.
    return tokenizer.encode(text, add_special_tokens=False), reference


def exact_match(generated_text: str, reference: str) -> bool:
    """Whether the generation (decoded up to its first stop token) is the reference, ignoring
    surrounding whitespace."""
    return generated_text.strip() == reference.strip()


# ---------------------------------------------------------------------------------------------
# Shared


def _check_choice(key: str, value: Any, valid: Sequence[str]) -> None:
    if value not in valid:
        raise JftError(f"{key}={value!r}; valid: {', '.join(valid)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
