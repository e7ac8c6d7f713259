"""`got-d`: the candidates that pull the pool's distribution toward the target's
(Kang et al., ICLR 2024, "Get more for less").

Pool and target are embedded (mean of the model's final hidden states); one optimal
transport problem between the two (uniform masses, `transport.py`, solved by POT) gives
the pool's dual potentials f, and the calibrated gradient f_i − mean_{j≠i} f_j is the
change in OT(pool, target) when mass moves onto example i. The most negative gradients
are chosen: the examples whose weight would bring the pool closest to the target.
"""

from __future__ import annotations

from jft.select.methods.base import Context, Selection, SelectionMethod, register, top
from jft.select.transport import got_d_scores


@register
class GotD(SelectionMethod):
    name = "got-d"
    needs_target = True

    def select(self, context: Context) -> Selection:
        options = context.options
        gradients = got_d_scores(context.embeddings("pool"), context.embeddings("target"),
                                 metric=options.metric, solver=options.solver, reg=options.reg)
        scores = -gradients  # the most negative gradient is the most preferred
        return Selection(top(scores, context.budget), scores)
