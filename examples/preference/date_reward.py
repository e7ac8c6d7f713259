"""A partial-credit reward for GRPO on the quickstart date task (`objective.reward:
date_reward:partial`, run from examples/preference/): a completion in the DD/MM/YYYY form
earns a third for each of the day, month and year it gets right, anything else 0. From the
base model exact matches are too rare for GRPO's groups to differ; this gives them a
gradient (docs/preference.md)."""

from __future__ import annotations

import re

DATE = re.compile(r"^\s*(\d{2})/(\d{2})/(\d{4})\s*$")


def partial(prompt: str, completion: str, example: dict) -> float:
    got, want = DATE.match(completion), DATE.match(example["completion"])
    if got is None or want is None:
        return 0.0
    return sum(a == b for a, b in zip(got.groups(), want.groups(), strict=True)) / 3
