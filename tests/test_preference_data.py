"""jft.training.preference_data and the paired batching of jft.training.data: the `preference`
and `kto` formats on the real SmolLM2 tokenizer, [first; second] batches packed alike,
resuming, bad input, and exact-match references."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from jft.errors import JftError
from jft.formats.bundled import bundled_path
from jft.formats.gguf_file import GGUFFile
from jft.objectives.kto import DESIRABLE_FIELD
from jft.text.tokenizer import Tokenizer, load_tokenizer_from_gguf
from jft.training.config import load_config
from jft.training.data import (
    Batcher,
    DataConfig,
    PairedExamples,
    TokenizedExample,
    TokenizedExamples,
    batcher,
    completion_reference,
    load_examples,
    prompt_ids,
    read_split,
    tokenize_example,
    tokenize_examples,
)
from tests.test_data import _target_spans

ROOT = Path(__file__).resolve().parents[1]
IM_END = "<|im_end|>"

PLAIN_PREFERENCES = [
    {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " Lyon."},
    {"prompt": 'Quote "this";\nthen a new line', "chosen": "x,y\n\tz", "rejected": ""},
    {"prompt": "Unicode: café 日本語 🙂", "chosen": " ok 👍", "rejected": " non"},
]
CONTEXT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2 + 2?"},
]
CHAT_PREFERENCE = {
    "prompt": CONTEXT,
    "chosen": [{"role": "assistant", "content": "4, of course."}],
    "rejected": "5, I think.",
}
KTO_RECORDS = [
    {"prompt": "Is the sky blue?", "completion": " Yes.", "label": True},
    {"prompt": "Is grass red?", "completion": " Yes, always.", "label": False},
    {"prompt": "2 + 2?", "completion": " 4", "label": 1},
    {"prompt": "3 + 3?", "completion": " 7", "label": 0},
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    # The bundled SmolLM2-135M-Instruct's own tokenizer (ChatML, EOS <|im_end|>, no BOS), read
    # from its GGUF metadata alone, without the weights.
    return load_tokenizer_from_gguf(GGUFFile(bundled_path("smollm2-135m-instruct")).metadata)


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer) -> Tokenizer:
    """The same tokenizer, but one that starts a plain prompt with BOS (as Llama's does)."""
    bos = copy.copy(tokenizer)
    bos.add_bos = True
    assert bos.bos_id is not None
    return bos


def _config(format: str, **changes) -> DataConfig:
    return DataConfig(train="unused", format=format, **changes)


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


# ---------------------------------------------------------------------------------------------
# Tokenizing preference and KTO records


@pytest.mark.parametrize("bos", [False, True], ids=["no_bos", "bos"])
def test_plain_preference_is_prompt_ids_then_chosen_or_rejected_and_eos_as_prompt_completion(
    request, bos
):
    tokenizer = request.getfixturevalue("bos_tokenizer" if bos else "tokenizer")
    eos = tokenizer.eos_id
    start = [tokenizer.bos_id] if bos else []
    for completion_only_loss in (True, False):  # preference targets are completions either way
        paired = tokenize_examples(
            PLAIN_PREFERENCES,
            tokenizer,
            _config("preference", completion_only_loss=completion_only_loss),
        )
        assert isinstance(paired, PairedExamples) and len(paired) == len(PLAIN_PREFERENCES)
        for index, record in enumerate(PLAIN_PREFERENCES):
            prompt = start + tokenizer.encode(record["prompt"], add_special_tokens=False)
            assert prompt == prompt_ids(tokenizer, record["prompt"])
            for half, field in ((paired.first, "chosen"), (paired.second, "rejected")):
                example = half[index]
                reply = tokenizer.encode(record[field], add_special_tokens=False) + [eos]
                assert example.tokens == prompt + reply
                assert example.loss_mask == [False] * len(prompt) + [True] * len(reply)
                assert example.fields == {}
                spans = _target_spans(tokenizer, example.tokens, example.loss_mask)
                assert spans == [record[field] + IM_END]
            # The chosen sequence is exactly what prompt_completion makes of {prompt, chosen}.
            as_sft = tokenize_example(
                {"prompt": record["prompt"], "completion": record["chosen"]},
                tokenizer,
                _config("prompt_completion"),
            )
            assert paired.first[index] == as_sft


def test_chat_preference_targets_only_the_final_assistant_turn_through_its_end_of_turn(tokenizer):
    paired = tokenize_examples([CHAT_PREFERENCE], tokenizer, _config("preference"))
    generation_prompt = tokenizer.encode(
        tokenizer.apply_chat_template(CONTEXT, add_generation_prompt=True),
        add_special_tokens=False,
    )
    chosen = CHAT_PREFERENCE["chosen"][0]["content"]
    rejected = CHAT_PREFERENCE["rejected"]  # a plain string: the assistant's reply
    for example, content in ((paired.first[0], chosen), (paired.second[0], rejected)):
        reply = {"role": "assistant", "content": content}
        rendered = tokenizer.apply_chat_template([*CONTEXT, reply], add_generation_prompt=False)
        assert example.tokens == tokenizer.encode(rendered, add_special_tokens=False)
        # One run of targets: the final turn and its <|im_end|>, not the earlier "Hello! ..."
        # assistant turn of the prompt, nor the template's newline after <|im_end|>.
        assert _target_spans(tokenizer, example.tokens, example.loss_mask) == [content + IM_END]
        first = example.loss_mask.index(True)
        assert example.tokens[:first] == generation_prompt
        last = len(example.loss_mask) - 1 - example.loss_mask[::-1].index(True)
        assert example.tokens[last] == tokenizer.eos_id
        assert tokenizer.decode(example.tokens[last + 1 :], skip_special_tokens=False) == "\n"
        # Format chat trains on every assistant turn of the same conversation.
        as_chat = tokenize_example({"messages": [*CONTEXT, reply]}, tokenizer, _config("chat"))
        assert as_chat.tokens == example.tokens
        assert _target_spans(tokenizer, as_chat.tokens, as_chat.loss_mask) == [
            CONTEXT[2]["content"] + IM_END,
            content + IM_END,
        ]


def test_chat_preference_file_reads_and_tokenizes_like_the_records(tokenizer, tmp_path):
    path = _write_jsonl(tmp_path / "prefs.jsonl", [CHAT_PREFERENCE, CHAT_PREFERENCE])
    records, paired = read_split(
        DataConfig(train=str(path), format="preference"), tokenizer, cache_dir=str(tmp_path / "c")
    )
    assert len(records) == 2 and isinstance(paired, PairedExamples)
    expected = tokenize_examples([CHAT_PREFERENCE], tokenizer, _config("preference"))
    for index in range(2):
        assert paired.first[index] == expected.first[0]
        assert paired.second[index] == expected.second[0]


def test_kto_pairs_each_completion_with_the_previous_records_and_marks_every_token(
    tokenizer, tmp_path
):
    eos = tokenizer.eos_id
    paired = tokenize_examples(KTO_RECORDS, tokenizer, _config("kto"))
    # bool and 0/1 labels are both accepted, from a file too.
    path = _write_jsonl(tmp_path / "kto.jsonl", KTO_RECORDS)
    _, from_file = read_split(
        DataConfig(train=str(path), format="kto"), tokenizer, cache_dir=str(tmp_path / "c")
    )
    for tokenized in (paired, from_file):
        assert isinstance(tokenized, PairedExamples) and len(tokenized) == len(KTO_RECORDS)
        assert tokenized.first.fields[DESIRABLE_FIELD].dtype == np.bool_
        for index, record in enumerate(KTO_RECORDS):
            label = bool(record["label"])
            prompt = prompt_ids(tokenizer, record["prompt"])
            previous = KTO_RECORDS[index - 1]["completion"]  # record 0 takes the last one's
            for example, completion in (
                (tokenized.first[index], record["completion"]),
                (tokenized.second[index], previous),
            ):
                reply = tokenizer.encode(completion, add_special_tokens=False) + [eos]
                assert example.tokens == prompt + reply
                assert example.loss_mask == [False] * len(prompt) + [True] * len(reply)
                assert len(example.fields[DESIRABLE_FIELD]) == len(example.tokens)
            assert tokenized.first[index].fields[DESIRABLE_FIELD] == [label] * len(
                tokenized.first[index].tokens
            )


def test_kto_mismatched_completion_takes_the_form_of_its_prompt(tokenizer):
    records = [
        {
            "prompt": [{"role": "user", "content": "Hello?"}],
            "completion": [{"role": "assistant", "content": "Sure."}],
            "label": True,
        },
        {"prompt": "Plain?", "completion": " plain", "label": False},
    ]
    paired = tokenize_examples(records, tokenizer, _config("kto"))
    # Record 0 (a conversation) with record 1's string completion as the assistant's reply.
    conversation = [*records[0]["prompt"], {"role": "assistant", "content": " plain"}]
    rendered = tokenizer.apply_chat_template(conversation, add_generation_prompt=False)
    second = paired.second[0]
    assert second.tokens == tokenizer.encode(rendered, add_special_tokens=False)
    assert _target_spans(tokenizer, second.tokens, second.loss_mask) == [" plain" + IM_END]
    # Record 1 (plain text) with record 0's assistant message as text.
    assert paired.second[1].tokens == (
        prompt_ids(tokenizer, "Plain?")
        + tokenizer.encode("Sure.", add_special_tokens=False)
        + [tokenizer.eos_id]
    )
    assert paired.first[0].fields[DESIRABLE_FIELD] == [True] * len(paired.first[0].tokens)
    assert paired.first[1].fields[DESIRABLE_FIELD] == [False] * len(paired.first[1].tokens)


# ---------------------------------------------------------------------------------------------
# Batching paired examples

FIRST_LENGTHS = [3, 9, 4, 12, 5, 7, 2, 20, 6, 10, 8, 1, 11]
SECOND_LENGTHS = [5, 2, 8, 3, 12, 7, 6, 18, 2, 4, 9, 3, 1]
WEIGHT = "weight"


def _synthetic_pairs() -> PairedExamples:
    """Pair i: first tokens 1000 (i + 1) + j, second 1000 (i + 1) + 500 + j, and a per-token
    float field (added with with_field) i + 0.25 on the first, i + 0.75 on the second."""

    def half(lengths, offset, weight):
        examples = TokenizedExamples.from_examples(
            TokenizedExample(
                [1000 * (i + 1) + offset + j for j in range(n)], [j % 3 != 0 for j in range(n)]
            )
            for i, n in enumerate(lengths)
        )
        values = np.repeat(np.arange(len(lengths)) + weight, lengths).astype(np.float32)
        return examples.with_field(WEIGHT, values)

    return PairedExamples(half(FIRST_LENGTHS, 0, 0.25), half(SECOND_LENGTHS, 500, 0.75))


def _row_segments(batch: dict, row: int) -> dict[int, tuple[int, int]]:
    """{segment id: (start column, length)} of one row, checking positions restart at 0."""
    segments = batch["segment_ids"][row]
    spans = {}
    for segment in sorted(set(segments[segments > 0].tolist())):
        columns = np.flatnonzero(segments == segment)
        start, n = int(columns[0]), len(columns)
        assert columns.tolist() == list(range(start, start + n))  # contiguous
        assert batch["positions"][row, start : start + n].tolist() == list(range(n))
        spans[segment] = (start, n)
    assert not batch["loss_mask"][row][segments == 0].any()
    return spans


def _check_paired_batch(
    batch: dict, paired: PairedExamples, batch_size: int, max_length: int
) -> list[int]:
    """Checks the [first; second] contract; returns the pair index of every (row, segment)."""
    assert batch["tokens"].shape == (2 * batch_size, max_length)
    for key in ("segment_ids", "positions", "loss_mask", WEIGHT):
        assert batch[key].shape == batch["tokens"].shape
    pairs = []
    for row in range(batch_size):
        first, second = _row_segments(batch, row), _row_segments(batch, batch_size + row)
        assert list(first) == list(second)  # the same segment ids in the same row
        for segment, (start, n) in first.items():
            index = int(batch["tokens"][row, start]) // 1000 - 1
            pairs.append(index)
            for r, (s, m), half in (
                (row, (start, n), paired.first),
                (batch_size + row, second[segment], paired.second),
            ):
                tokens, mask, fields = half.sequence(index)
                assert m == min(len(tokens), max_length)
                assert batch["tokens"][r, s : s + m].tolist() == tokens[:m].tolist()
                assert batch["loss_mask"][r, s : s + m].tolist() == [False, *mask[1:m].tolist()]
                assert batch[WEIGHT][r, s : s + m].tolist() == fields[WEIGHT][:m].tolist()
    return pairs


@pytest.mark.parametrize("packing", [True, False])
def test_paired_batches_pack_both_halves_alike_and_count_a_pair_as_one_example(packing):
    paired = _synthetic_pairs()
    batch_size, max_length = 3, 16
    batched = Batcher(
        paired, batch_size, max_length, packing=packing, shuffle=False, epochs=1, window=8
    )
    batches = list(batched)
    seen = []
    for batch in batches:
        rows = _check_paired_batch(batch, paired, batch_size, max_length)
        seen += rows
        if not packing:  # each row holds one pair's sequence
            assert set(batch["segment_ids"].ravel().tolist()) <= {0, 1}
    if packing:
        assert any(
            len(set(b["segment_ids"][r].tolist()) - {0}) > 1
            for b in batches
            for r in range(batch_size)
        )  # some row packs several pairs
    assert sorted(seen) == list(range(len(paired)))  # every pair once in an epoch
    counters = batched.counters
    kept = sum(np.minimum(lengths, max_length).sum() for lengths in (FIRST_LENGTHS, SECOND_LENGTHS))
    assert counters["examples"] == len(paired)  # a pair is one example
    assert counters["tokens"] == int(kept)  # the tokens of both sequences
    assert counters["targets"] == int(sum(b["loss_mask"].sum() for b in batches))
    assert counters["truncated"] == 1  # pair 7, both of whose sequences are overlong
    assert counters["dropped"] == 0


@pytest.mark.parametrize("packing", [True, False])
def test_paired_batcher_state_restores_to_identical_next_batches(packing):
    paired = _synthetic_pairs()

    def make():
        return Batcher(paired, 3, 16, packing=packing, seed=11, window=5)

    uninterrupted = make()
    expected = [next(uninterrupted) for _ in range(14)]
    assert uninterrupted.epoch >= 2  # the batches cross epochs
    for k in (0, 1, 5):
        first = make()
        for _ in range(k):
            next(first)
        state = json.loads(json.dumps(first.state()))
        assert state["settings"]["examples"] == len(paired)
        resumed = make()
        resumed.restore(state)
        assert resumed.counters == first.counters
        for want in expected[k : k + 6]:
            got = next(resumed)
            assert got.keys() == want.keys()
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"k={k} {key}")


def test_kto_batches_carry_desirable_beside_tokens(tokenizer):
    config = _config("kto", max_length=32)
    paired = tokenize_examples(KTO_RECORDS, tokenizer, config)
    batch_size = 2
    batches = list(batcher(paired, config, tokenizer, batch_size, split="eval"))
    seen = 0
    for batch in batches:
        assert batch["tokens"].shape == batch[DESIRABLE_FIELD].shape == (2 * batch_size, 32)
        assert batch[DESIRABLE_FIELD].dtype == np.bool_
        assert not batch[DESIRABLE_FIELD][batch["segment_ids"] == 0].any()
        assert (batch["tokens"][batch["segment_ids"] == 0] == tokenizer.pad_id).all()
        for row in range(batch_size):
            first, second = _row_segments(batch, row), _row_segments(batch, batch_size + row)
            assert list(first) == list(second)
            for segment, (start, n) in first.items():
                tokens = batch["tokens"][row, start : start + n].tolist()
                index = next(i for i in range(len(paired)) if paired.first[i].tokens == tokens)
                s, m = second[segment]
                assert batch["tokens"][batch_size + row, s : s + m].tolist() == (
                    paired.second[index].tokens
                )
                label = bool(KTO_RECORDS[index]["label"])
                assert (batch[DESIRABLE_FIELD][row, start : start + n] == label).all()
                seen += 1
    assert seen == len(KTO_RECORDS)


# ---------------------------------------------------------------------------------------------
# Bad input

PREFERENCE_NEEDS = "; format 'preference' needs "
BAD_RECORDS = [
    ("preference", {"prompt": "a", "chosen": "b"}, r'missing field "rejected"'),
    (
        "preference",
        {"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"},
        r'field "chosen" is a list; with a string "prompt" it must be a string',
    ),
    (
        "kto",
        {"prompt": "a", "completion": "b", "label": "yes"},
        r'field "label" is a string, not true or false',
    ),
    (
        "kto",
        {"prompt": "a", "completion": "b", "label": 2},
        r'field "label" is a number, not true or false',
    ),
]
GOOD = {
    "preference": {"prompt": "a", "chosen": "b", "rejected": "c"},
    "kto": {"prompt": "a", "completion": "b", "label": True},
}


@pytest.mark.parametrize(
    "format, record, problem",
    BAD_RECORDS,
    ids=["missing_rejected", "list_chosen_string_prompt", "label_yes", "label_2"],
)
def test_bad_records_are_one_line_errors_naming_file_record_and_field(
    tokenizer, tmp_path, format, record, problem
):
    path = _write_jsonl(tmp_path / f"{format}.jsonl", [GOOD[format], record])
    with pytest.raises(JftError) as raised:
        load_examples(path, format, cache_dir=str(tmp_path / "c"))
    message = str(raised.value)
    assert "\n" not in message
    assert re.match(
        rf"^{re.escape(str(path))}: line 2 \(record 1\): {problem}; format "
        rf"'{format}' needs ",
        message,
    ), message
    # Records given as a list are checked as they are tokenized, naming the source.
    with pytest.raises(JftError, match=rf"^prefs: record 1: {problem}; format '{format}'"):
        tokenize_examples([GOOD[format], record], tokenizer, _config(format), source="prefs")


def test_chat_chosen_without_an_assistant_message_is_refused(tokenizer, tmp_path):
    record = {"prompt": CONTEXT, "chosen": [{"role": "user", "content": "b"}], "rejected": "c"}
    path = _write_jsonl(tmp_path / "prefs.jsonl", [CHAT_PREFERENCE, record])
    with pytest.raises(JftError) as raised:
        load_examples(path, "preference", cache_dir=str(tmp_path / "c"))
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: line 2 (record 1): ")
    assert 'no message of "chosen" has role "assistant"' in message


@pytest.mark.parametrize("field", ["chosen", "rejected"])
def test_chat_completion_without_an_assistant_message_names_its_field(field):
    record = {**CHAT_PREFERENCE, field: [{"role": "user", "content": "b"}]}
    with pytest.raises(JftError) as raised:
        tokenize_examples([record], None, _config("preference"), source="prefs")
    problem = str(raised.value).split(PREFERENCE_NEEDS)[0]  # the needs list names every field
    assert f'"{field}"' in problem, problem


@pytest.mark.parametrize("format", ["preference", "kto"])
def test_streaming_is_refused_for_paired_formats_naming_data_streaming(format):
    with pytest.raises(JftError, match=rf"^data\.streaming is not available for format {format}"):
        DataConfig(train="unused", format=format, streaming=True)


def _load(*overrides):
    base = ["model=smollm2-135m-instruct", "data.train=train.jsonl", "output_dir=out"]
    return load_config(None, [*base, *overrides], check_paths=False)


def test_config_pairs_objectives_with_their_data_formats():
    assert _load("objective.name=dpo", "data.format=preference").data.format == "preference"
    assert _load("objective.name=kto", "data.format=kto").objective.name == "kto"
    for objective, format, pattern in (
        (
            "sft",
            "preference",
            r"objective sft trains on data\.format .*, not preference \(format "
            r"preference is for objective dpo, ",
        ),
        (
            "sft",
            "kto",
            r"objective sft trains on data\.format .*, not kto \(format kto is for "
            r"objective kto\)",
        ),
        ("kto", "preference", r"objective kto trains on data\.format kto, not preference"),
        (
            "dpo",
            "prompt_completion",
            r"objective dpo trains on data\.format preference, not "
            r"prompt_completion",
        ),
        (
            "dpo",
            "kto",
            r"objective dpo trains on data\.format preference, not kto \(format kto "
            r"is for objective kto\)",
        ),
    ):
        with pytest.raises(JftError, match=rf"^override 'data\.format={format}': {pattern}"):
            _load(f"objective.name={objective}", f"data.format={format}")
    with pytest.raises(JftError, match=r"eval\.generate needs reference answers; format kto"):
        _load("objective.name=kto", "data.format=kto", "data.eval=eval.jsonl", "eval.generate=true")


def test_train_cli_refuses_objective_and_format_mismatch_in_one_line(tmp_path):
    train = _write_jsonl(tmp_path / "prefs.jsonl", [GOOD["preference"]])
    runs = {}
    for objective, format in (("sft", "preference"), ("dpo", "prompt_completion")):
        config = tmp_path / f"{objective}.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "model": "smollm2-135m-instruct",
                    "objective": objective,
                    "data": {"train": str(train), "format": format},
                    "output_dir": str(tmp_path / f"run_{objective}"),
                }
            )
        )
        runs[objective] = (
            config,
            subprocess.Popen(
                [sys.executable, "-m", "jft.train", str(config)],
                cwd=ROOT,
                text=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            ),
        )
    results = {
        name: (config, *process.communicate(timeout=120), process.returncode)
        for name, (config, process) in runs.items()
    }
    for config, out, err, status in results.values():
        assert status == 2, err[-2000:]
        assert out == "" and "Traceback" not in err
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith(f"error: {config}: ") and "data.format" in lines[0]
    sft_line = results["sft"][2].strip()
    assert "objective sft trains on data.format" in sft_line and "not preference" in sft_line
    assert "format preference is for objective dpo" in sft_line
    dpo_line = results["dpo"][2].strip()
    assert "objective dpo trains on data.format preference, not prompt_completion" in dpo_line
    assert not (tmp_path / "run_sft").exists() and not (tmp_path / "run_dpo").exists()


# ---------------------------------------------------------------------------------------------
# Exact-match references


def test_preference_reference_is_the_prompt_ids_and_the_chosen_text_and_kto_has_none(tokenizer):
    record = PLAIN_PREFERENCES[0]
    ids, reference = completion_reference(record, "preference", tokenizer)
    assert ids == prompt_ids(tokenizer, record["prompt"])
    assert reference == record["chosen"]
    trained = tokenize_examples([record], tokenizer, _config("preference")).first[0]
    assert trained.tokens[: len(ids)] == ids and not any(trained.loss_mask[: len(ids)])
    assert completion_reference(record, "preference") == (record["prompt"], record["chosen"])

    ids, reference = completion_reference(CHAT_PREFERENCE, "preference", tokenizer)
    assert reference == "4, of course."
    trained = tokenize_examples([CHAT_PREFERENCE], tokenizer, _config("preference")).first[0]
    assert trained.tokens[: len(ids)] == ids  # the ids training saw before the chosen turn
    assert trained.loss_mask.index(True) == len(ids)
    assert completion_reference(CHAT_PREFERENCE, "preference") == (CONTEXT, "4, of course.")

    with pytest.raises(JftError, match=r"format 'kto' marks completions desirable or not"):
        completion_reference(KTO_RECORDS[0], "kto", tokenizer)


def test_an_unknown_role_is_named_by_its_own_field_and_index(tokenizer):
    record = {**CHAT_PREFERENCE, "chosen": [{"role": "wizard", "content": "x"},
                                            {"role": "assistant", "content": "b"}]}
    with pytest.raises(JftError, match=r'prefs: record 0: "chosen"\[0\] has role "wizard"'):
        tokenize_examples([record], tokenizer, _config("preference"), source="prefs")


def test_pairs_that_fit_only_half_by_half_are_refused_naming_the_file_and_key(tokenizer):
    long = " one two three four five six seven"
    records = [{"prompt": "a", "chosen": long, "rejected": " x"},
               {"prompt": "a", "chosen": " x", "rejected": long}]
    with pytest.raises(JftError, match=r"^prefs: no example fits data.max_length=5"):
        tokenize_examples(records, tokenizer, _config("preference", max_length=5,
                                                      overlong="drop"), source="prefs")


def test_a_field_of_the_second_sequences_only_is_batched_as_zeros_in_the_first(tokenizer):
    paired = tokenize_examples(PLAIN_PREFERENCES[:2], tokenizer, _config("preference"))
    paired = PairedExamples(paired.first, paired.second.with_field(
        "w", np.ones(len(paired.second.tokens), np.float32)))
    batch = next(iter(Batcher(paired, 2, 64, packing=False, shuffle=False)))
    assert batch["w"][:2].sum() == 0 and batch["w"][2:].sum() == len(paired.second.tokens)
