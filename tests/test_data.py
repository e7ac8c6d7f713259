"""jft.training.data: reading, loss masks on the real SmolLM2 tokenizer, packing, bucketing
and resuming."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import re
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jft.errors import JftError
from jft.formats.bundled import bundled_path
from jft.formats.gguf_file import GGUFFile
from jft.text.tokenizer import Tokenizer, load_tokenizer_from_gguf
from jft.training.data import (
    Batcher,
    DataConfig,
    TokenizedExample,
    TokenizedExamples,
    completion_reference,
    exact_match,
    load_examples,
    make_batcher,
    prompt_ids,
    read_split,
    tokenize_example,
    tokenize_examples,
)

IM_END = "<|im_end|>"

PROMPT_COMPLETION = [
    {"prompt": "What is the capital of France?", "completion": " Paris."},
    {"prompt": "42", "completion": ""},  # looks like a number; empty completion
    {"prompt": 'Quote "this", please;\nthen a new line', "completion": "x,y\n\tz"},
    {"prompt": "Unicode: café 日本語 🙂", "completion": " ok 👍"},
]
CHATS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4, of course."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue\nor green."},
        ]
    },
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    # The bundled SmolLM2-135M-Instruct's own tokenizer (ChatML, EOS <|im_end|>, no BOS), read
    # from its GGUF metadata alone, as jft.load does, without the weights.
    return load_tokenizer_from_gguf(GGUFFile(bundled_path("smollm2-135m-instruct")).metadata)


def _targets(tokenizer: Tokenizer, example: TokenizedExample) -> str:
    ids = [t for t, m in zip(example.tokens, example.loss_mask, strict=True) if m]
    return tokenizer.decode(ids, skip_special_tokens=False)


def _target_spans(tokenizer: Tokenizer, tokens, mask) -> list[str]:
    """The decoded runs of consecutive targets."""
    spans, run = [], []
    for token, target in zip(list(tokens) + [0], list(mask) + [False], strict=True):
        if target:
            run.append(int(token))
        elif run:
            spans.append(tokenizer.decode(run, skip_special_tokens=False))
            run = []
    return spans


# ---------------------------------------------------------------------------------------------
# Loss masks on the real tokenizer


def test_text_targets_every_token_after_the_first_and_ends_with_eos(tokenizer):
    config = DataConfig(train="unused", format="text")
    example = tokenize_example({"text": "The quick brown fox."}, tokenizer, config)
    assert example.tokens == tokenizer.encode("The quick brown fox.") + [tokenizer.eos_id]
    assert example.loss_mask == [False] + [True] * (len(example.tokens) - 1)


def test_prompt_completion_targets_decode_to_the_completion_and_eos(tokenizer):
    config = DataConfig(train="unused", format="prompt_completion")
    for record in PROMPT_COMPLETION:
        example = tokenize_example(record, tokenizer, config)
        assert _targets(tokenizer, example) == record["completion"] + IM_END
        # The untargeted start is exactly what generation is fed for that prompt.
        prompt = tokenizer.encode(record["prompt"])
        assert example.tokens[: len(prompt)] == prompt
        assert not any(example.loss_mask[: len(prompt)])
        assert all(example.loss_mask[len(prompt) :])


def test_chat_targets_decode_to_each_assistant_turn_and_its_end_of_turn(tokenizer):
    config = DataConfig(train="unused", format="chat")
    for record in CHATS:
        example = tokenize_example(record, tokenizer, config)
        # The pieces are cut at turn boundaries, yet give the ids of the whole rendering.
        rendered = tokenizer.apply_chat_template(record["messages"], add_generation_prompt=False)
        assert example.tokens == tokenizer.encode(rendered, add_special_tokens=False)
        assistant = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        spans = _target_spans(tokenizer, example.tokens, example.loss_mask)
        assert spans == [content + IM_END for content in assistant]


def test_without_completion_only_loss_every_token_but_the_first_is_a_target(tokenizer):
    for format, record in (("prompt_completion", PROMPT_COMPLETION[0]), ("chat", CHATS[0])):
        config = DataConfig(train="unused", format=format, completion_only_loss=False)
        example = tokenize_example(record, tokenizer, config)
        assert example.loss_mask == [False] + [True] * (len(example.tokens) - 1)


def test_chat_template_without_end_of_turn_token_gets_eos_appended(tokenizer):
    plain = copy.copy(tokenizer)
    plain.chat_template = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    config = DataConfig(train="unused", format="chat")
    example = tokenize_example(CHATS[1], plain, config)
    assert _target_spans(plain, example.tokens, example.loss_mask) == ["Blue\nor green.\n" + IM_END]


def test_chat_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    odd = copy.copy(tokenizer)
    odd.chat_template = (
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m.content }}\n{% endfor %}"
    )
    with pytest.raises(JftError, match=r"record 3: .*assistant message 2 cannot be located"):
        tokenize_example(
            CHATS[0], odd, DataConfig(train="unused", format="chat"), where="chat.jsonl: record 3"
        )


def test_chat_roles_the_template_does_not_know_are_refused_naming_the_record(tokenizer, tmp_path):
    wizard = {
        "messages": [
            {"role": "wizard", "content": "Abracadabra."},
            {"role": "assistant", "content": "Poof."},
        ]
    }
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(CHATS[1]) + "\n" + json.dumps(wizard) + "\n")
    config = DataConfig(train=str(path), format="chat")
    pattern = (
        rf'^{re.escape(str(path))}: record 1: "messages"\[0\] has role "wizard", which the chat '
        r"template \(GGUF metadata tokenizer\.chat_template\) does not know; valid roles: "
        r"assistant, system, tool, user$"
    )
    with pytest.raises(JftError, match=pattern):
        read_split(config, tokenizer, cache_dir=str(tmp_path / "c"))
    # A template that names a role of its own (as Llama 3 names "ipython") accepts it.
    wizardly = copy.copy(tokenizer)
    wizardly.chat_template = (
        "{% for m in messages %}{% if m.role == 'wizard' %}*{% endif %}<|im_start|>{{ m.role }}\n"
        "{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    example = tokenize_example(wizard, wizardly, config)
    assert _target_spans(wizardly, example.tokens, example.loss_mask) == ["Poof." + IM_END]


def test_completion_reference_gives_the_prompt_ids_training_saw(tokenizer):
    config = DataConfig(train="unused", format="prompt_completion")
    record = PROMPT_COMPLETION[0]
    ids, reference = completion_reference(record, "prompt_completion", tokenizer)
    assert ids == prompt_ids(tokenizer, record["prompt"]) == tokenizer.encode(record["prompt"])
    assert tokenize_example(record, tokenizer, config).tokens[: len(ids)] == ids
    assert reference == " Paris."
    assert completion_reference(record, "prompt_completion") == (record["prompt"], " Paris.")

    chat = CHATS[0]
    ids, reference = completion_reference(chat, "chat", tokenizer)
    trained = tokenize_example(chat, tokenizer, DataConfig(train="unused", format="chat"))
    assert trained.tokens[: len(ids)] == ids and reference == "4, of course."
    messages, reference = completion_reference(chat, "chat")
    assert messages == chat["messages"][:4]
    with pytest.raises(JftError, match="format 'text' has none"):
        completion_reference({"text": "x"}, "text")


def test_exact_match_ignores_surrounding_whitespace_only():
    assert exact_match("  Paris.\n", " Paris.")
    assert not exact_match("Paris", "Paris.")
    assert not exact_match("paris.", "Paris.")


# ---------------------------------------------------------------------------------------------
# Reading files


def _write_all_kinds(directory: Path, records: list[dict], csv_ok: bool = True) -> list[Path]:
    paths = []
    jsonl = directory / "data.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n\n" for r in records))
    paths.append(jsonl)
    array = directory / "data.json"
    array.write_text(json.dumps(records, indent=2))
    paths.append(array)
    parquet = directory / "data.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    paths.append(parquet)
    if csv_ok:
        path = directory / "data.csv"
        with open(path, "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=list(records[0]))
            writer.writeheader()
            for record in records:
                row = {k: v if isinstance(v, str) else json.dumps(v) for k, v in record.items()}
                writer.writerow(row)
        paths.append(path)
    saved = directory / "saved"
    datasets.Dataset.from_list(records).save_to_disk(str(saved))
    paths.append(saved)
    return paths


def test_every_file_kind_reads_the_same_records(tmp_path):
    paths = _write_all_kinds(tmp_path, PROMPT_COMPLETION)
    assert [p.name for p in paths] == [
        "data.jsonl",
        "data.json",
        "data.parquet",
        "data.csv",
        "saved",
    ]
    for path in paths:
        for streaming in (False, True):
            examples = load_examples(
                path, "prompt_completion", streaming=streaming, cache_dir=str(tmp_path / "c")
            )
            assert [dict(r) for r in examples] == PROMPT_COMPLETION, (path, streaming)
    loaded = load_examples(paths[0], "prompt_completion", cache_dir=str(tmp_path / "c"))
    assert isinstance(loaded, datasets.Dataset)


def test_every_file_kind_tokenizes_chats_the_same(tmp_path, tokenizer):
    # The CSV cells hold each conversation's messages as a JSON string.
    config = DataConfig(train="unused", format="chat")
    expected = [tokenize_example(r, tokenizer, config) for r in CHATS]
    for path in _write_all_kinds(tmp_path, CHATS):
        examples = load_examples(path, "chat", cache_dir=str(tmp_path / "c"))
        assert list(tokenize_examples(examples, tokenizer, config)) == expected, path
        stream = tokenize_examples(
            load_examples(path, "chat", streaming=True), tokenizer, config, source=str(path)
        )
        assert list(stream) == expected, path


def test_reading_shows_no_progress_bars_and_leaves_their_setting_alone(tmp_path, capfd):
    # On a terminal the bars would sit between the status lines and a data error.
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in PROMPT_COMPLETION))
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,answer\na,b\n")
    were_disabled = datasets.are_progress_bars_disabled()
    datasets.enable_progress_bars()
    try:
        assert len(load_examples(good, "prompt_completion", cache_dir=str(tmp_path / "c"))) == 4
        with pytest.raises(JftError, match=r'bad\.csv: record 0: missing field "completion"'):
            load_examples(bad, "prompt_completion", cache_dir=str(tmp_path / "c"))
        assert not datasets.are_progress_bars_disabled()
    finally:
        if were_disabled:
            datasets.disable_progress_bars()
    assert "Generating train split" not in capfd.readouterr().err


def test_malformed_jsonl_names_the_first_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(PROMPT_COMPLETION[0])
    path.write_text(f"{good}\n\n{good}\n{{'prompt': 'single quotes'}}\n{{broken\n")
    with pytest.raises(JftError, match=r"bad\.jsonl: line 4 is not valid JSON"):
        load_examples(path, "prompt_completion", cache_dir=str(tmp_path / "c"))
    stream = load_examples(path, "prompt_completion", streaming=True)  # line 1 is fine
    with pytest.raises(JftError, match=r"bad\.jsonl: line 4 is not valid JSON"):
        list(stream)
    path.write_text(f"{good}\n[1, 2]\n")
    with pytest.raises(JftError, match=r"line 2 \(record 1\) is a JSON a list; expected one JSON"):
        load_examples(path, "prompt_completion", cache_dir=str(tmp_path / "c"))


def test_missing_field_names_the_field_record_and_format(tmp_path):
    path = tmp_path / "missing.jsonl"
    records = [PROMPT_COMPLETION[0], PROMPT_COMPLETION[1], {"prompt": "no completion"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    pattern = r'line 3 \(record 2\): missing field "completion"; format \'prompt_completion\''
    with pytest.raises(JftError, match=pattern):
        load_examples(path, "prompt_completion", cache_dir=str(tmp_path / "c"))

    parquet = tmp_path / "text.parquet"
    pq.write_table(pa.Table.from_pylist([{"body": "x"}]), parquet)
    with pytest.raises(JftError, match=r'record 0: missing field "text" \(its fields: body\)'):
        load_examples(parquet, "text", cache_dir=str(tmp_path / "c"))
    with pytest.raises(JftError, match=r'record 0: missing field "text"'):
        load_examples(parquet, "text", streaming=True)

    saved = tmp_path / "saved"
    datasets.Dataset.from_list(
        [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}]
    ).save_to_disk(str(saved))
    with pytest.raises(JftError, match=r'saved: record 1: missing field "completion"'):
        load_examples(saved, "prompt_completion")

    chat = tmp_path / "chat.jsonl"
    bad_chat = {"messages": [{"role": "user", "content": "hi"}, {"content": "hello"}]}
    chat.write_text(json.dumps(CHATS[1]) + "\n" + json.dumps(bad_chat) + "\n")
    with pytest.raises(JftError, match=r'record 1\): "messages"\[1\] has no string "role"'):
        load_examples(chat, "chat", cache_dir=str(tmp_path / "c"))


def test_wrong_field_types_and_chats_without_assistant_are_refused(tmp_path):
    path = tmp_path / "types.jsonl"
    path.write_text('{"prompt": "a", "completion": 5}\n')
    with pytest.raises(JftError, match=r'field "completion" is a number, not a string'):
        load_examples(path, "prompt_completion", cache_dir=str(tmp_path / "c"))
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(JftError, match=r'record 0\): no message has role "assistant"'):
        load_examples(path, "chat", cache_dir=str(tmp_path / "c"))


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.jsonl", ""),
        ("blank.jsonl", "\n  \n"),
        ("empty.json", "[]"),
        ("empty.csv", ""),
        ("header_only.csv", "prompt,completion\n"),
    ],
)
def test_empty_files_are_refused(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    for streaming in (False, True):
        with pytest.raises(JftError, match=rf"{name}: empty, it holds no records"):
            load_examples(
                path, "prompt_completion", streaming=streaming, cache_dir=str(tmp_path / "c")
            )


def test_empty_parquet_missing_path_and_unknown_suffix_are_refused(tmp_path):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    with pytest.raises(JftError, match="empty.parquet: empty, it holds no records"):
        load_examples(empty, "text", cache_dir=str(tmp_path / "c"))
    with pytest.raises(JftError, match="nope.jsonl: no such file or directory; expected a .jsonl"):
        load_examples(tmp_path / "nope.jsonl", "text")
    (tmp_path / "data.txt").write_text("hello\n")
    with pytest.raises(JftError, match=r"data.txt: unsupported file type '.txt'"):
        load_examples(tmp_path / "data.txt", "text")
    with pytest.raises(JftError, match=r"not one written by datasets' save_to_disk"):
        load_examples(tmp_path, "text")
    with pytest.raises(JftError, match=r"format='plain'; valid: text, prompt_completion, chat"):
        load_examples(empty, "plain")


def test_data_config_names_bad_keys():
    with pytest.raises(JftError, match=r"data.format='sft'; valid: text, prompt_completion, chat"):
        DataConfig(train="a.jsonl", format="sft")
    with pytest.raises(JftError, match=r"data.overlong='cut'; valid: truncate, drop"):
        DataConfig(train="a.jsonl", overlong="cut")
    with pytest.raises(JftError, match=r"data.max_length=0; expected an integer >= 2"):
        DataConfig(train="a.jsonl", max_length=0)


# ---------------------------------------------------------------------------------------------
# Batching


def _synthetic(lengths: list[int]) -> TokenizedExamples:
    """Example i is tokens 1000 * (i + 1) + 0, 1, ...: every token names its example and place."""
    return TokenizedExamples.from_examples(
        TokenizedExample([1000 * (i + 1) + j for j in range(n)], [j % 3 != 0 for j in range(n)])
        for i, n in enumerate(lengths)
    )


def _segments(batch: dict) -> list[list[tuple[int, int, int]]]:
    """Per row, (example index, start column, length) of each segment, checking the contract."""
    rows = []
    for b in range(batch["tokens"].shape[0]):
        tokens, segments = batch["tokens"][b], batch["segment_ids"][b]
        positions, mask = batch["positions"][b], batch["loss_mask"][b]
        row, column, width = [], 0, len(tokens)
        while column < width and segments[column] != 0:
            segment = segments[column]
            assert segment == len(row) + 1
            end = column
            while end < width and segments[end] == segment:
                end += 1
            n = end - column
            assert positions[column:end].tolist() == list(range(n))
            assert not mask[column]  # the first token of an example is never a target
            row.append((int(tokens[column]) // 1000 - 1, column, n))
            column = end
        assert not segments[column:].any() and not mask[column:].any()
        assert not positions[column:].any()
        rows.append(row)
    return rows


def _check_whole(batch: dict, examples: TokenizedExamples, max_length: int) -> None:
    for b, row in enumerate(_segments(batch)):
        for index, start, n in row:
            tokens, mask = examples.arrays(index)
            assert n == min(len(tokens), max_length)
            assert batch["tokens"][b, start : start + n].tolist() == tokens[:n].tolist()
            assert batch["loss_mask"][b, start + 1 : start + n].tolist() == mask[1:n].tolist()


def test_packing_fills_rows_with_whole_examples_and_restarts_positions():
    lengths = [3, 9, 4, 12, 5, 7, 2, 16, 6, 10, 8, 1, 11, 5, 3, 4]
    examples = _synthetic(lengths)
    batcher = Batcher(examples, batch_size=2, max_length=16, packing=True, seed=1, epochs=1)
    seen, per_row = [], []
    for batch in batcher:
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
            "tokens": ((2, 16), np.int32),
            "segment_ids": ((2, 16), np.int32),
            "positions": ((2, 16), np.int32),
            "loss_mask": ((2, 16), np.bool_),
        }
        _check_whole(batch, examples, 16)
        for row in _segments(batch):
            seen += [index for index, _, _ in row]
            per_row.append(len(row))
    assert sorted(seen) == list(range(len(lengths)))  # each example once, none split
    assert max(per_row) >= 3
    assert len([n for n in per_row if n]) == -(-sum(lengths) // 16)  # first-fit is tight here
    assert batcher.counters == {
        "examples": 16,
        "tokens": sum(lengths),
        "truncated": 0,
        "dropped": 0,
        "targets": int(sum(m[1:].sum() for m in (examples.arrays(i)[1] for i in range(16)))),
    }


def test_unpacked_rows_hold_one_example_each_in_length_buckets():
    rng = np.random.default_rng(0)
    lengths = (rng.permutation(64) + 1).tolist()
    examples = _synthetic(lengths)
    batcher = Batcher(examples, batch_size=4, max_length=64, packing=False, seed=3, epochs=1)
    seen = []
    for batch in batcher:
        _check_whole(batch, examples, 64)
        rows = _segments(batch)
        assert all(len(row) == 1 for row in rows)
        batch_lengths = sorted(row[0][2] for row in rows)
        assert batch_lengths[-1] - batch_lengths[0] == 3  # four neighbours in length
        seen += [row[0][0] for row in rows]
    assert sorted(seen) == list(range(64))


def test_shuffling_depends_on_seed_and_epoch_only():
    examples = _synthetic([5, 9, 3, 7, 2, 8, 6, 4] * 4)

    def first_rows(seed, count):
        batcher = Batcher(examples, 2, 16, packing=False, seed=seed)
        return [tuple(next(batcher)["tokens"][:, 0]) for _ in range(count)]

    assert first_rows(7, 40) == first_rows(7, 40)
    assert first_rows(7, 40) != first_rows(8, 40)
    epochs = first_rows(7, 32)  # 16 batches per epoch: the same examples, in another order
    assert sorted(x for b in epochs[:16] for x in b) == sorted(x for b in epochs[16:] for x in b)
    assert epochs[:16] != epochs[16:]


def _stream_of(examples: TokenizedExamples) -> datasets.IterableDataset:
    records = [{"tokens": t.tokens, "loss_mask": t.loss_mask} for t in examples]
    return datasets.Dataset.from_list(records).to_iterable_dataset()


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("kind", ["arrays", "list", "dataset", "stream"])
def test_restored_state_continues_with_identical_batches(packing, kind):
    lengths = [3, 9, 4, 12, 5, 7, 2, 30, 6, 10, 8, 1, 11, 5, 3, 4, 13, 2, 9, 6, 7]
    arrays = _synthetic(lengths)
    examples = {
        "arrays": lambda: arrays,
        "list": lambda: list(arrays),
        "dataset": lambda: datasets.Dataset.from_list(
            [{"tokens": t.tokens, "loss_mask": t.loss_mask} for t in arrays]
        ),
        "stream": lambda: _stream_of(arrays),
    }[kind]

    def make():
        return Batcher(examples(), 3, 16, packing=packing, seed=11, window=8)

    uninterrupted = make()
    expected = [next(uninterrupted) for _ in range(20)]
    assert uninterrupted.epoch >= 2  # the batches cross epochs
    for k in (0, 1, 4, 9):
        first = make()
        for _ in range(k):
            next(first)
        state = json.loads(json.dumps(first.state()))
        resumed = make()
        resumed.restore(state)
        assert resumed.counters == first.counters
        for want in expected[k : k + 8]:
            got = next(resumed)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{kind} k={k} {key}")


def test_restore_refuses_a_state_from_other_settings():
    examples = _synthetic([4, 5, 6])
    state = Batcher(examples, 2, 16, seed=1).state()
    with pytest.raises(JftError, match=r"saved with seed=1, this run has seed=2"):
        Batcher(examples, 2, 16, seed=2).restore(state)
    with pytest.raises(JftError, match=r"saved with examples=3, this run has examples=2"):
        Batcher(_synthetic([4, 5]), 2, 16, seed=1).restore(state)


@pytest.mark.parametrize("packing", [True, False])
def test_truncate_keeps_the_first_tokens_and_drop_skips_and_both_count(packing):
    lengths = [5, 20, 30, 8, 16]  # two longer than max_length=16
    examples = _synthetic(lengths)
    truncating = Batcher(examples, 2, 16, packing, seed=0, epochs=1, overlong="truncate")
    batches = list(truncating)
    for batch in batches:
        _check_whole(batch, examples, 16)
    assert truncating.counters["truncated"] == 2
    assert truncating.counters["dropped"] == 0
    assert truncating.counters["examples"] == 5
    assert truncating.counters["tokens"] == 5 + 16 + 16 + 8 + 16

    dropping = Batcher(examples, 2, 16, packing, seed=0, epochs=1, overlong="drop")
    kept = [index for batch in dropping for row in _segments(batch) for index, _, _ in row]
    assert sorted(kept) == [0, 3, 4]
    assert dropping.counters["dropped"] == 2
    assert dropping.counters["truncated"] == 0
    assert dropping.counters["examples"] == 3
    with pytest.raises(JftError, match=r"no example fits max_length=4 .* overlong='drop'"):
        Batcher(examples, 2, 4, packing, overlong="drop")


def test_finite_epochs_pad_or_drop_the_last_batch():
    examples = _synthetic([4, 5, 6, 7, 8])
    padded = list(Batcher(examples, 2, 8, packing=False, shuffle=False, epochs=1))
    assert len(padded) == 3
    assert not padded[-1]["segment_ids"][1].any()  # an empty padding row
    assert len(list(Batcher(examples, 2, 8, False, epochs=1, drop_remainder=True))) == 2
    assert len(list(Batcher(examples, 2, 8, False, epochs=3))) == 8  # 15 rows, last one padded


def test_make_batcher_batches_a_chat_file_end_to_end(tmp_path, tokenizer):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CHATS * 3))
    config = DataConfig(train=str(path), eval=str(path), format="chat", max_length=128)
    for streaming in (False, True):
        config = dataclasses.replace(config, streaming=streaming)
        for split in ("train", "eval"):
            batcher = make_batcher(
                config, tokenizer, 2, seed=0, split=split, cache_dir=str(tmp_path / "c")
            )
            batch = next(batcher)
            assert batch["tokens"].shape == (2, 128)
            spans = _target_spans(tokenizer, batch["tokens"].ravel(), batch["loss_mask"].ravel())
            assert set(spans) <= {
                m["content"] + IM_END
                for r in CHATS
                for m in r["messages"]
                if m["role"] == "assistant"
            }
            assert batcher.counters["examples"] >= 2
    # A streamed file resumes too: skipped records are read again but not tokenized.
    config = dataclasses.replace(config, streaming=True)
    cache = str(tmp_path / "c")
    uninterrupted = make_batcher(config, tokenizer, 2, seed=5, cache_dir=cache)
    expected = [next(uninterrupted) for _ in range(6)]
    first = make_batcher(config, tokenizer, 2, seed=5, cache_dir=cache)
    for _ in range(3):
        next(first)
    resumed = make_batcher(config, tokenizer, 2, seed=5, cache_dir=cache)
    resumed.restore(json.loads(json.dumps(first.state())))
    for want in expected[3:]:
        got = next(resumed)
        assert all(np.array_equal(got[key], want[key]) for key in want)
    eval_batches = list(
        make_batcher(config, tokenizer, 4, split="eval", cache_dir=str(tmp_path / "c"))
    )
    assert sum(len(row) for b in eval_batches for row in _segments_of_any(b)) == 6


def test_examples_truncated_to_no_completion_token_warn_once_and_all_of_them_are_refused(
    tokenizer, tmp_path
):
    short = {"prompt": "Hi", "completion": " there"}
    long = {"prompt": "word " * 40, "completion": " yes"}  # its prompt fills max_length
    some = tmp_path / "some.jsonl"
    some.write_text("".join(json.dumps(r) + "\n" for r in (short, long, long)))
    every = tmp_path / "every.jsonl"
    every.write_text(json.dumps(long) + "\n")
    cache = str(tmp_path / "c")
    for streaming in (False, True):
        config = DataConfig(train=str(some), max_length=16, streaming=streaming)
        with pytest.warns(UserWarning) as warned:
            _, tokenized = read_split(config, tokenizer, cache_dir=cache)
            for _ in range(2):  # a stream is checked as its first pass ends, and only then
                assert len(list(tokenized)) == 3
        assert [str(w.message) for w in warned] == [
            f"{some}: 2 of 3 examples keep no completion token within data.max_length=16 (their "
            "prompts fill it) and train on nothing; raise data.max_length or shorten their prompts"
        ]
        config = dataclasses.replace(config, train=str(every))
        with pytest.raises(JftError) as raised:
            list(read_split(config, tokenizer, cache_dir=cache)[1])
        assert str(raised.value) == (
            f"{every}: no example keeps a completion token within data.max_length=16 (the "
            "prompts fill it), so there is nothing to train on; raise data.max_length or shorten "
            "the prompts"
        )


def test_overlong_drop_that_drops_everything_names_the_file_and_data_max_length(
    tokenizer, tmp_path
):
    records = [{"prompt": "word " * 10, "completion": " yes"}, PROMPT_COMPLETION[0]]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = DataConfig(train=str(path), max_length=4, overlong="drop")
    shortest = min(len(tokenize_example(r, tokenizer, config).tokens) for r in records)
    for streaming in (False, True):
        config = dataclasses.replace(config, streaming=streaming)
        with pytest.raises(JftError) as raised:
            make_batcher(config, tokenizer, 2, cache_dir=str(tmp_path / "c"))
        assert str(raised.value) == (
            f"{path}: no example fits data.max_length=4 (the shortest has {shortest} tokens) and "
            "data.overlong=drop drops them all; raise data.max_length or set data.overlong to "
            "truncate"
        )


def _segments_of_any(batch: dict) -> list[list[int]]:
    return [sorted(set(row[row > 0].tolist())) for row in batch["segment_ids"]]
