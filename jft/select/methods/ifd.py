"""`ifd`: instruction-following difficulty (Li et al. 2024, "From quantity to quality").

IFD(x) = PPL(answer | instruction) / PPL(answer alone): how little the instruction helps
the model predict the answer. Both perplexities are exp of the mean cross-entropy of the
answer's tokens; the answer alone is its text after BOS (prompt-completion: the
completion; chat: the assistant turns' text). The examples kept are those with the
highest IFD below `--ifd-max` (1 by default): at or above 1 the instruction does not
help at all, which the paper reads as instruction and answer not belonging together.
"""

from __future__ import annotations

import numpy as np

from jft.errors import JftError
from jft.select.methods.base import Context, Selection, SelectionMethod, register, top


def ifd_scores(context: Context) -> np.ndarray:
    """IFD [N] of every pool example."""
    pool = context.pool
    if pool.answers is None:
        raise JftError(f"{pool.path}: format {pool.format} has no instruction; ifd needs "
                       "prompt_completion or chat data")
    return np.exp(context.losses("examples") - context.losses("answers"))


@register
class InstructionFollowingDifficulty(SelectionMethod):
    name = "ifd"

    def select(self, context: Context) -> Selection:
        scores = ifd_scores(context)
        eligible = scores < context.options.ifd_max
        chosen = top(scores, context.budget, eligible)
        report = [f"ifd: {int(eligible.sum())} of {len(scores)} below {context.options.ifd_max}"]
        if len(chosen) < context.budget:
            report.append(f"ifd: only {len(chosen)} eligible examples, fewer than the budget")
        return Selection(chosen, scores, report=report)
