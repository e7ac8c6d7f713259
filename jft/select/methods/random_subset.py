"""`random`: a uniformly random subset (seeded), the baseline every method should beat."""

from __future__ import annotations

import numpy as np

from jft.select.methods.base import Context, Selection, SelectionMethod, register, top


@register
class RandomSubset(SelectionMethod):
    name = "random"

    def select(self, context: Context) -> Selection:
        scores = np.random.default_rng(context.seed).random(len(context.pool))
        return Selection(top(scores, context.budget), scores)
