"""`dedup`: drop near-duplicates by embedding similarity (Deita's Repr Filter).

The pool is walked in its own order, and a record is kept only if the cosine similarity
of its embedding to every record already kept is at most `--threshold` (Deita: 0.9),
until the budget is met. Embeddings are the mean of the model's final hidden states
over the record's tokens, centred on the pool's mean: a language model's hidden states
share a large common direction, so that uncentred, nearly every pair of records is
above 0.9 (on examples/select/pool.jsonl, SmolLM2's keep 10 of 3,300 uncentred and 743
centred).
"""

from __future__ import annotations

import numpy as np

from jft.select.diversity import greedy_dedup
from jft.select.methods.base import Context, Selection, SelectionMethod, register


@register
class Dedup(SelectionMethod):
    name = "dedup"

    def select(self, context: Context) -> Selection:
        vectors = context.embeddings()
        vectors = vectors - vectors.mean(axis=0)
        order = np.arange(len(vectors))
        chosen = greedy_dedup(vectors, order, threshold=context.options.threshold,
                              budget=context.budget)
        scores = np.full(len(vectors), np.nan)
        scores[chosen] = -np.arange(len(chosen), dtype=np.float64)  # walk order
        report = [f"dedup: {len(chosen)} kept at cosine similarity <= "
                  f"{context.options.threshold}"]
        return Selection(chosen, scores, report=report)
