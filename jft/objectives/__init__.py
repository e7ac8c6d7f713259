"""Training objectives: what a step minimises, one file each behind `Objective`.

An objective turns (model config, frozen params, adapters, batch, rng) into a scalar loss
and aux metrics. It may run the forward pass as often as it needs: a reference pass is
the same forward with the trained adapter off (the deltas are kept apart from the base),
and extra batch fields (a rejected completion, a replay batch) arrive in the batch dict,
each a [B, ...] array the data pipeline adds. `python -m jft.train` picks one with the
config key `objective:` (a name, or `{name: ..., option: ...}`; default `sft`).
docs/architecture.md shows how to add one; docs/preference.md covers the preference and
reward objectives.
"""

from jft.objectives import dpo, grpo, kto, orpo, sft, simpo
from jft.objectives.base import (
    OBJECTIVES,
    Objective,
    ObjectiveBase,
    get_objective,
    make_objective,
    register,
)

__all__ = ["OBJECTIVES", "Objective", "ObjectiveBase", "dpo", "get_objective", "grpo", "kto",
           "make_objective", "orpo", "register", "sft", "simpo"]
