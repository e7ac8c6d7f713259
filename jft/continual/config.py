"""The continual config: `python -m jft.train`'s config plus `tasks:`, `general:` and
`continual:` (docs/continual.md).

Every top-level key of the training config means the same here and applies to every
stage; `data:` holds the shared data settings (format, max_length, packing), its
`train`/`eval` files coming from each task. A task may override `steps`,
`learning_rate` and `format`, and names its `metric`. `continual:` is the strategy's
name and its options, checked against the strategy's own `Options` dataclass.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from jft.errors import JftError
from jft.training.config import (
    TrainConfig,
    _build,
    _Context,
    _plain,
    fingerprint_of,
    from_dict,
    read_config_file,
)

Metric = Literal["exact_match", "rouge_l"]
STAGES_DIR = "stages"
TASK_KEYS = ("name", "train", "eval", "steps", "learning_rate", "format", "metric")
# Keys that do not change what a continual run computes (resuming ignores them).
FINGERPRINT_EXCLUDED = ("output_dir", "remat", "kernels", "checkpoint", "mesh",
                        "train.log_every", "train.max_bad_steps")


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of the sequence: its files, its overrides and how it is scored."""

    name: str
    train: str
    eval: str
    steps: int | None = None
    learning_rate: float | None = None
    format: str | None = None
    metric: Metric = "exact_match"


@dataclasses.dataclass(frozen=True)
class ContinualSection:
    """`continual:`: the strategy and its options (an instance of its `Options`)."""

    strategy: str
    options: Any

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, **_plain(dataclasses.asdict(self.options))}


@dataclasses.dataclass(frozen=True)
class ContinualConfig:
    """A resolved continual config: the shared training config (`base`, whose data files
    are the first task's), the tasks, the general-text file and the strategy."""

    base: TrainConfig
    tasks: tuple[Task, ...]
    general: str | None
    continual: ContinualSection

    @property
    def output_dir(self) -> Path:
        return Path(self.base.output_dir)

    def stage(self, index: int, method=None) -> TrainConfig:
        """The training config of stage `index` (its task's files and overrides, its own
        directory and seed; `method` where the strategy changes it per stage)."""
        task = self.tasks[index]
        base = self.base
        data = dataclasses.replace(base.data, train=task.train, eval=task.eval,
                                   format=task.format or base.data.format)
        train = dataclasses.replace(
            base.train, steps=task.steps or base.train.steps,
            learning_rate=task.learning_rate or base.train.learning_rate,
            seed=base.train.seed + index,
            warmup_steps=min(base.train.warmup_steps, task.steps or base.train.steps))
        return dataclasses.replace(
            base, data=data, train=train, method=method or base.method,
            output_dir=str(self.stage_dir(index)))

    def stage_dir(self, index: int) -> Path:
        return self.output_dir / STAGES_DIR / f"{index + 1:02d}-{self.tasks[index].name}"

    def to_dict(self) -> dict[str, Any]:
        out = self.base.to_dict()
        out["data"] = {k: v for k, v in out["data"].items() if k not in ("train", "eval")}
        out["tasks"] = [{k: v for k, v in dataclasses.asdict(t).items() if v is not None}
                        for t in self.tasks]
        out["general"] = self.general
        out["continual"] = self.continual.to_dict()
        return out

    def fingerprint(self) -> str:
        return fingerprint_of(self.to_dict(), FINGERPRINT_EXCLUDED)


def load_continual_config(path: str | None, overrides: Sequence[str] = (), *,
                          check_paths: bool = True) -> ContinualConfig:
    """CONFIG.yaml with `key.sub=value` overrides, validated like `jft.train`'s; any
    problem is a JftError naming the key (`tasks[1].train`, `continual.ratio`)."""
    if path is None:
        raise JftError("give the continual config file: python -m jft.continual CONFIG.yaml")
    raw, applied = read_config_file(path, overrides)
    return continual_from_dict(raw, str(path), applied, check_paths=check_paths)


def continual_from_dict(raw: Mapping[str, Any], source: str = "config",
                        overrides: Mapping[str, str] | None = None, *,
                        check_paths: bool = True) -> ContinualConfig:
    from jft.continual.strategies import STRATEGIES

    context = _Context(source, dict(overrides or {}))
    raw = copy.deepcopy(dict(raw))
    tasks = _tasks(raw.pop("tasks", None), context, check_paths)
    general = raw.pop("general", None)
    if general is not None and not isinstance(general, str):
        context.fail("general", f"general must be the path of a plain-text file (format "
                     f"text: one {{\"text\": ...}} per line), got {general!r}")
    if general is not None and check_paths and not Path(general).exists():
        context.fail("general", f"general: no such file {general}")
    section = raw.pop("continual", None) or {}
    if not isinstance(section, Mapping):
        context.fail("continual", f"continual must be a section of keys, got {section!r}")
    section = dict(section)
    name = section.pop("strategy", "sequential")
    if name not in STRATEGIES:
        context.fail("continual.strategy", f"continual.strategy {name!r} is not a strategy; "
                     f"valid: {', '.join(sorted(STRATEGIES))}")
    strategy = STRATEGIES[name]
    options = _build(strategy.Options, section, "continual", context)
    data = raw.setdefault("data", {})
    if not isinstance(data, Mapping):
        context.fail("data", f"data must be a section of keys, got {data!r}")
    for key in ("train", "eval"):
        if key in data:
            context.fail(f"data.{key}", f"data.{key}: each task gives its own files "
                         f"(tasks[i].{key}); remove data.{key}")
    data["train"], data["eval"] = tasks[0].train, tasks[0].eval
    base = from_dict(raw, source, overrides, check_paths=check_paths)
    if base.objective.name != "sft":
        context.fail("objective", f"objective {base.objective.name} does not apply to a "
                     "continual run: its strategy chooses each stage's loss (SFT, with "
                     "GeRe's or O-LoRA's terms); remove objective")
    if base.eval.every:
        context.fail("eval.every", "eval.every does not apply to a continual run: every task "
                     "is evaluated after each stage; remove it")
    config = ContinualConfig(base, tasks, general, ContinualSection(name, options))
    for index, task in enumerate(tasks):  # each stage's config validates as a run's does
        try:
            from_dict(_stage_raw(config, index), source, check_paths=False)
        except JftError as error:
            context.fail(f"tasks[{index}]", f"tasks[{index}] ({task.name}): {error}")
    strategy.check(config, context)
    return config


def _stage_raw(config: ContinualConfig, index: int) -> dict:
    return config.stage(index).to_dict()


def _tasks(raw: Any, context: _Context, check_paths: bool) -> tuple[Task, ...]:
    if not isinstance(raw, list) or not raw:
        context.fail("tasks", "tasks must be a list of at least one task, each with name, "
                     f"train and eval (and optional {', '.join(TASK_KEYS[3:])}), got {raw!r}")
    tasks, seen = [], set()
    for index, entry in enumerate(raw):
        where = f"tasks[{index}]"
        if not isinstance(entry, Mapping):
            context.fail(where, f"{where} must be a mapping with name, train and eval, "
                         f"got {entry!r}")
        for key in entry:
            if key not in TASK_KEYS:
                context.fail(f"{where}.{key}", f"unknown key {where}.{key}; valid: "
                             f"{', '.join(TASK_KEYS)}")
        for key in ("name", "train", "eval"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                context.fail(f"{where}.{key}", f"{where}.{key} is missing; it must be "
                             f"{'a name' if key == 'name' else 'a data file path'}")
        name = entry["name"]
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            context.fail(f"{where}.name", f"{where}.name {name!r} must be letters, digits, "
                         "'_', '-' or '.' (it names the stage's directory)")
        if name in seen:
            context.fail(f"{where}.name", f"{where}.name {name!r} is a duplicate; task names "
                         "must be unique")
        seen.add(name)
        if check_paths:
            for key in ("train", "eval"):
                if not Path(entry[key]).exists():
                    context.fail(f"{where}.{key}", f"{where}.{key}: no such file {entry[key]}")
        task = _build(Task, entry, where, context)
        if task.format == "text":
            context.fail(f"{where}.format", f"{where}.format text has no reference answers "
                         "to score; use prompt_completion or chat")
        tasks.append(task)
    return tuple(tasks)
