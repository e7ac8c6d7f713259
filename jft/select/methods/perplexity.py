"""`perplexity`: keep the examples whose targets the model finds most (or least) likely.

Perplexity is exp(mean cross-entropy of the example's target tokens): the completion
of prompt-completion data, the assistant turns of chat, the whole text of text data.
`--keep low` (the default) drops what the model finds least plausible, often noise
(garbled or wrong answers); `--keep high` keeps the hardest examples instead.
"""

from __future__ import annotations

import numpy as np

from jft.errors import JftError
from jft.select.methods.base import Context, Selection, SelectionMethod, register, top


@register
class Perplexity(SelectionMethod):
    name = "perplexity"

    def select(self, context: Context) -> Selection:
        keep = context.options.keep
        if keep not in ("low", "high"):
            raise JftError(f"--keep {keep!r}; valid: low, high")
        perplexity = np.exp(context.losses())
        scores = -perplexity if keep == "low" else perplexity
        chosen = top(scores, context.budget)
        return Selection(chosen, scores, report=[
            f"perplexity: pool median {np.nanmedian(perplexity):.3g}, chosen median "
            f"{np.median(perplexity[chosen]):.3g}"])
