"""`sequential`: plain fine-tuning, task after task, with any method (the baseline).

One adapter is carried from task to task (a fresh optimiser each stage), or, with
`merge_between_tasks`, each task trains a fresh adapter that is merged into the base
when it ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from jft.continual.strategies.base import Strategy, register


class Sequential(Strategy):
    name = "sequential"

    @dataclass(frozen=True)
    class Options:
        merge_between_tasks: bool = False

    def carry(self, options):
        return "merge" if options.merge_between_tasks else "carry"


SEQUENTIAL = register(Sequential())
