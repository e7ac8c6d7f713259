"""Replay data: which past examples a stage replays, and batches mixing them with the task's.

A mixed batch is the task batcher's rows followed by the replay batcher's (both the
stage's `data.max_length`), with a `replay` [B] bool column marking the replayed rows;
both batchers are `jft.training.data.Batcher`s, so the mix is deterministic and resumes
exactly from `state()`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from jft.errors import JftError
from jft.training.data import Batcher, TokenizedExamples


class MixedBatcher:
    """`rows` of each batch from `replay`, the rest from `task` (each a Batcher whose
    batch size is its share)."""

    def __init__(self, task: Batcher, replay: Batcher):
        self.task, self.replay = task, replay

    def __iter__(self) -> MixedBatcher:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        task, replay = next(self.task), next(self.replay)
        batch = {key: np.concatenate([task[key], replay[key]]) for key in task}
        batch["replay"] = np.arange(len(batch["tokens"])) >= len(task["tokens"])
        return batch

    @property
    def counters(self) -> dict[str, int]:
        return {k: v + self.replay.counters[k] for k, v in self.task.counters.items()}

    def state(self) -> dict:
        return {"task": self.task.state(), "replay": self.replay.state()}

    def restore(self, state: Mapping) -> None:
        if not isinstance(state, Mapping) or set(state) != {"task", "replay"}:
            raise JftError("data state: this checkpoint was saved without replay; resume with "
                           "the same continual strategy")
        self.task.restore(state["task"])
        self.replay.restore(state["replay"])


def replay_rows(batch_size: int, ratio: float) -> int:
    """Rows of each batch given to replay: the nearest to `ratio`, at least one, and at
    least one left to the task."""
    if batch_size < 2:
        raise JftError(f"replay needs train.batch_size of at least 2 (a row for the task and "
                       f"one for replay), got {batch_size}")
    return min(max(round(batch_size * ratio), 1), batch_size - 1)


def reservoir(sizes: Sequence[int], capacity: int, seed: int) -> list[tuple[int, int]]:
    """(task, example) pairs of a reservoir (Vitter's algorithm R) of `capacity` examples
    fed the tasks' examples in order: a uniform sample of everything seen so far."""
    rng = np.random.default_rng(seed)
    kept: list[tuple[int, int]] = []
    seen = 0
    for task, size in enumerate(sizes):
        for example in range(size):
            if len(kept) < capacity:
                kept.append((task, example))
            else:
                slot = int(rng.integers(0, seen + 1))
                if slot < capacity:
                    kept[slot] = (task, example)
            seen += 1
    return kept


def per_task(sizes: Sequence[int], quota: int, seed: int) -> list[tuple[int, int]]:
    """(task, example) pairs: `quota` examples of each task drawn without replacement (all
    of a smaller one), so every past task is replayed equally often (ConPET's memory)."""
    out = []
    for task, size in enumerate(sizes):
        rng = np.random.default_rng([seed, task])
        picked = np.sort(rng.choice(size, min(quota, size), replace=False))
        out += [(task, int(i)) for i in picked]
    return out


def gather(examples: Sequence[TokenizedExamples], pairs: Sequence[tuple[int, int]]
           ) -> TokenizedExamples:
    """The chosen examples as one TokenizedExamples."""
    return TokenizedExamples.from_examples(examples[task][i] for task, i in pairs)
