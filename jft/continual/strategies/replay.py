"""`replay`: experience replay for any method. Past tasks' training examples are kept in
a buffer and fill a fixed share of every batch.

buffer `reservoir` keeps `buffer_size` examples drawn uniformly from everything seen so
far (Vitter's algorithm R over the tasks in order); `per_task` keeps `per_task` examples
of each past task, so every old task is replayed equally often. The buffer is rebuilt
from the seed at each stage, so a resumed run replays exactly the same examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from jft.continual.mixing import gather, per_task, replay_rows, reservoir
from jft.continual.strategies.base import Replay, Strategy, register
from jft.training.config import _field


class ReplayStrategy(Strategy):
    name = "replay"

    @dataclass(frozen=True)
    class Options:
        buffer: Literal["reservoir", "per_task"] = "reservoir"
        buffer_size: int = _field(200, min=1)
        per_task: int = _field(50, min=1)
        ratio: float = _field(0.25, above=0.0, below=1.0)  # the share of each batch's rows
        merge_between_tasks: bool = False

    def check(self, config, context):
        check_batch(config, context)

    def carry(self, options):
        return "merge" if options.merge_between_tasks else "carry"

    def replay(self, run, options, index):
        if index == 0:
            return None
        sizes = [len(tokens) for tokens in run.train_tokens[:index]]
        seed = run.config.base.train.seed
        pairs = (reservoir(sizes, options.buffer_size, seed) if options.buffer == "reservoir"
                 else per_task(sizes, options.per_task, seed))
        return Replay(gather(run.train_tokens, pairs),
                      replay_rows(run.config.base.train.batch_size, options.ratio))


def check_batch(config, context):
    """Replay needs a row for the task and one for the replay."""
    if config.base.train.batch_size < 2:
        context.fail("train.batch_size", "replay needs train.batch_size of at least 2 (a row "
                     f"for the task and one for replay), got {config.base.train.batch_size}")


REPLAY = register(ReplayStrategy())
