"""Training objectives: what a step minimises, one file each behind `Objective`.

An objective turns (model config, frozen params, adapters, batch, rng) into a scalar loss
and aux metrics. It may run the forward pass as often as it needs: a reference pass is
the same forward with `adapters=()` (the deltas are kept apart from the base), and extra
batch fields (a rejected completion, a replay batch) arrive in the batch dict, each a
[B, ...] array the data pipeline adds. `python -m jft.train` picks one with the config
key `objective:` (default `sft`). docs/architecture.md shows how to add one.
"""

from jft.objectives import sft
from jft.objectives.base import OBJECTIVES, Objective, get_objective, register

__all__ = ["OBJECTIVES", "Objective", "get_objective", "register", "sft"]
