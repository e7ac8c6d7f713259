"""A partial-credit reward for GRPO on the quickstart date task (`objective.reward:
date_reward:partial`, run from examples/preference/). From the base model exact matches
never come (it copies the ISO date or talks), so every completion of a group scores 0
and GRPO has nothing to learn from; this reward tells its completions apart
(docs/preference.md):

- a completion in the DD/MM/YYYY form: 0.5, plus 0.5 × the fraction of day, month and
  year it gets right;
- anything else: 0.5 × the fraction of the reference's day, month, year it writes, in
  that order (the day first, then the month after it, then the year after that).
"""

from __future__ import annotations

import re

DATE = re.compile(r"^\s*(\d{2})/(\d{2})/(\d{4})\s*$")


def partial(prompt: str, completion: str, example: dict) -> float:
    want = DATE.match(example["completion"])
    if want is None:
        return 0.0
    fields = want.groups()
    got = DATE.match(completion)
    if got is not None:
        return 0.5 + 0.5 * sum(a == b for a, b in zip(got.groups(), fields, strict=True)) / 3
    found, start = 0, 0
    for field in fields:
        at = completion.find(field, start)
        if at < 0:
            break
        found, start = found + 1, at + len(field)
    return 0.5 * found / 3
