"""`hft`: Half Fine-Tuning across tasks (Hui et al. 2024; the `hft` method). Every task
trains a fresh random half of the linears (category-level, per layer, as the method
draws it from the stage's seed) for the whole task, and its update is merged into the
base before the next, so different tasks write to partly different parameters while
half of what each task saw stays as it was.
"""

from __future__ import annotations

import dataclasses

from jft.continual.strategies.base import Strategy, register


class HftStrategy(Strategy):
    name = "hft"
    method = "hft"

    def carry(self, options):
        return "merge"

    def stage_method(self, config, options, index):
        method = config.base.method
        steps = config.stage(index).train.steps  # one round: the half chosen stays all task
        return dataclasses.replace(
            method, config=dataclasses.replace(method.config, interval_steps=steps))


HFT = register(HftStrategy())
