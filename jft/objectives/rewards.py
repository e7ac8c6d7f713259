"""GRPO's verifiable rewards: each scores one completion, (prompt, completion, example) to a
float; `objective.reward` names them and a list sums them, weighted.

- `exact_match`: 1.0 when the completion, stripped, equals the reference answer (the
  example's `answer_field`, or its completion / last assistant message), else 0.0 (the
  comparison `eval.generate` reports as eval_exact_match);
- `regex`: 1.0 when `objective.pattern` matches the completion (`re.search`), else 0.0;
- `module:function`: a Python function of yours, imported from the working directory or
  the installed packages, called as function(prompt, completion, example) -> float.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from jft.errors import JftError

Reward = Callable[[str, str, Mapping], float]
BUILT_IN = ("exact_match", "regex")
_USER = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def check_reward_names(rewards: Sequence[str], pattern: str | None) -> None:
    """Refuses a name that is neither built in nor `module:function`, and a bad pattern."""
    for name in rewards:
        if name not in BUILT_IN and not _USER.match(name):
            raise JftError(f"{name!r} is not a reward; valid: {', '.join(BUILT_IN)}, or "
                           "module:function (a Python function of prompt, completion, example)")
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as error:
            raise JftError(f"pattern {pattern!r} is not a regular expression ({error})") from None


def exact_match(completion: str, reference: str) -> float:
    return float(completion.strip() == reference.strip())


def load_rewards(names: Sequence[str], pattern: str | None
                 ) -> list[Callable[[str, str, Mapping, str], float]]:
    """The reward functions, each called as (prompt, completion, example, reference answer);
    a user function that cannot be imported is a one-line error."""
    compiled = re.compile(pattern) if pattern is not None else None
    rewards = []
    for name in names:
        if name == "exact_match":
            rewards.append(lambda prompt, completion, example, reference: exact_match(
                completion, reference))
        elif name == "regex":
            rewards.append(lambda prompt, completion, example, reference: float(
                compiled.search(completion) is not None))
        else:
            user = _import(name)
            rewards.append(lambda prompt, completion, example, reference, user=user: user(
                prompt, completion, example))
    return rewards


def _import(name: str) -> Reward:
    module_name, function_name = name.split(":")
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # as `python -m` puts it
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # the user's module may fail in any way on import
        raise JftError(f"objective.reward {name}: cannot import module {module_name} "
                       f"({type(error).__name__}: {error})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise JftError(f"objective.reward {name}: module {module_name} has no function "
                       f"{function_name}")
    return function


def score(rewards: Sequence[Callable], weights: Sequence[float] | None, prompt: str,
          completion: str, example: Mapping, reference: str, names: Sequence[str]
          ) -> tuple[float, list[float]]:
    """(the weighted sum, each reward's value) of one completion."""
    values = []
    for reward, name in zip(rewards, names, strict=True):
        try:
            value = reward(prompt, completion, example, reference)
            value = float(value)
        except Exception as error:  # a user function's failure, named
            raise JftError(f"objective.reward {name} failed on a completion: "
                           f"{type(error).__name__}: {error}") from None
        values.append(value)
    weights = weights or [1.0] * len(values)
    return sum(w * v for w, v in zip(weights, values, strict=True)), values
