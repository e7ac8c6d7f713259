"""Preference and KTO data: records to `PairedExamples`, the two sequences of each example
packed alike ([first; second], see `jft.objectives.sequences`).

- `preference` (`prompt`, `chosen`, `rejected`): first = prompt + chosen, second = prompt +
  rejected. Plain text: the prompt's ids (BOS when the tokenizer adds one), then the
  completion's and EOS, as `prompt_completion`. Chat: `prompt` is a list of messages and
  each completion one or more assistant messages (or a string, the assistant's reply),
  rendered through the chat template; the completion's turns are the targets.
- `kto` (`prompt`, `completion`, `label`): first = prompt + completion, every token
  carrying the label as the per-token field `desirable`; second = the prompt with the
  previous record's completion (record 0 takes the last one's), the mismatched pair TRL
  estimates KTO's KL term from.

Only completion tokens are targets whatever `data.completion_only_loss` says: a
sequence's log-probability is its completion's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from jft.errors import JftError
from jft.objectives.kto import DESIRABLE_FIELD
from jft.training.data import (
    PairedExamples,
    TokenizedExample,
    TokenizedExamples,
    _chat_tokens,
    _check_roles,
    _json_type,
    _parse_messages,
    prompt_ids,
)

if TYPE_CHECKING:
    from jft.text.tokenizer import Tokenizer

COMPLETIONS = {"preference": ("chosen", "rejected"), "kto": ("completion",)}


def record_problem(record: Mapping, format: str) -> str | None:
    """What is wrong with a preference or KTO record, or None."""
    prompt = record["prompt"]
    if not isinstance(prompt, str):
        prompt = _parse_messages(prompt, "prompt", need_assistant=False)
        if isinstance(prompt, str):
            return prompt
    for field in COMPLETIONS[format]:
        value = record[field]
        if isinstance(value, str):
            continue
        if isinstance(prompt, str):
            return (f'field "{field}" is {_json_type(value)}; with a string "prompt" it must be '
                    "a string")
        messages = _parse_messages(value, field)
        if isinstance(messages, str):
            return messages
    if format == "kto" and not _is_label(record["label"]):
        return f'field "label" is {_json_type(record["label"])}, not true or false'
    return None


def _is_label(value: Any) -> bool:
    return isinstance(value, bool) or value in (0, 1)


def tokenize_pairs(records: Iterable[Mapping], tokenizer: Tokenizer, config, source: str
                   ) -> PairedExamples:
    """The records of a `preference` or `kto` file as `PairedExamples`."""
    from jft.training.data import _check_record

    records = list(records)
    first, second = [], []
    for index, record in enumerate(records):
        where = f"{source}: record {index}"
        _check_record(record, config.format, where)
        if config.format == "preference":
            first.append(sequence(record["prompt"], record["chosen"], tokenizer, where,
                                  "chosen"))
            second.append(sequence(record["prompt"], record["rejected"], tokenizer, where,
                                   "rejected"))
            continue
        label = bool(record["label"])
        example = sequence(record["prompt"], record["completion"], tokenizer, where,
                           "completion")
        first.append(TokenizedExample(example.tokens, example.loss_mask,
                                      {DESIRABLE_FIELD: [label] * len(example.tokens)}))
        previous = records[index - 1]["completion"]
        mismatched = sequence(record["prompt"], _like(previous, record["prompt"]), tokenizer,
                              f"{where} (with record {(index - 1) % len(records)}'s completion)",
                              "completion")
        second.append(TokenizedExample(mismatched.tokens, mismatched.loss_mask,
                                       {DESIRABLE_FIELD: [label] * len(mismatched.tokens)}))
    return PairedExamples(TokenizedExamples.from_examples(first),
                          TokenizedExamples.from_examples(second))


def sequence(prompt, completion, tokenizer: Tokenizer, where: str, field: str
             ) -> TokenizedExample:
    """Prompt + completion (the record's `field`), with the completion's tokens as the
    targets."""
    if tokenizer.eos_id is None:
        raise JftError("the tokenizer has no EOS token, which every example must end with")
    if isinstance(prompt, str):
        ids = prompt_ids(tokenizer, prompt)
        reply = tokenizer.encode(completion, add_special_tokens=False) + [tokenizer.eos_id]
        tokens, mask = ids + reply, [False] * len(ids) + [True] * len(reply)
    else:
        context = _parse_messages(prompt, "prompt", need_assistant=False)
        reply = _messages(completion, field)
        _check_roles(context, tokenizer, where, "prompt")
        _check_roles(reply, tokenizer, where, field)
        tokens, mask = _chat_tokens(context + reply, tokenizer, where,
                                    first_target=len(context))
    mask[0] = False
    return TokenizedExample(tokens, mask)


def _messages(completion, field: str = "completion") -> list[dict]:
    if isinstance(completion, str):
        return [{"role": "assistant", "content": completion}]
    return _parse_messages(completion, field)


def _like(completion, prompt):
    """A completion in the form `prompt` takes: text for a string prompt (the assistant
    messages' contents), messages for a conversation."""
    if isinstance(prompt, str) and not isinstance(completion, str):
        return "".join(m["content"] for m in _messages(completion) if m["role"] == "assistant")
    return completion


def prompt_and_reference(record: Mapping, tokenizer: Tokenizer | None):
    """What to generate from, and the chosen completion's text, for exact match."""
    prompt, chosen = record["prompt"], record["chosen"]
    reference = chosen if isinstance(chosen, str) else "".join(
        m["content"] for m in _messages(chosen) if m["role"] == "assistant")
    if isinstance(prompt, str):
        return (prompt if tokenizer is None else prompt_ids(tokenizer, prompt)), reference
    context = _parse_messages(prompt, "prompt", need_assistant=False)
    if tokenizer is None:
        return context, reference
    text = tokenizer.apply_chat_template(context, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False), reference
