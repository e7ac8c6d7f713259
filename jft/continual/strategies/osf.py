"""`osf`: orthogonal-subspace full fine-tuning across tasks ("Sculpting Subspaces", Nayak
et al. 2025; the `osf` method, jft/peft/osf.py).

Each task takes the SVD of every targeted weight as it is now (earlier tasks merged in),
freezes its top singular directions and trains in the rest; the task's update is merged
before the next. The frozen share grows over the sequence, as PEFT's OSF guide advises:
task i (0-based) of T keeps `preserved_rank + (1 - preserved_rank)·i/T` of each
weight's directions, so the first task already protects the pretrained model's top half
(PEFT's default) and the last still has (1 - preserved_rank)/T to learn in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from jft.continual.strategies.base import Strategy, register
from jft.training.config import _field


class OsfStrategy(Strategy):
    name = "osf"
    method = "osf"

    @dataclass(frozen=True)
    class Options:
        preserved_rank: float = _field(0.5, min=0.0, below=1.0)  # the first task's share

    def carry(self, options):
        return "merge"

    def stage_method(self, config, options, index):
        share = options.preserved_rank + (1 - options.preserved_rank) * index / len(config.tasks)
        method = config.base.method
        return dataclasses.replace(
            method, config=dataclasses.replace(method.config, preserved_rank=share))


OSF = register(OsfStrategy())
