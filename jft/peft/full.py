"""Full fine-tuning as a PEFT method: the delta *is* the trainable params.

`init` hands back the base's own arrays (no copy) for the selected leaves, the whole
params tree by default; `edit_params` puts the delta's leaves in place of the base's, so
`jax.grad` over the adapter differentiates exactly those weights while the rest of the
base stays a frozen constant. `merge` writes them into the base (cast to its dtypes).
There is no exact `unmerge`: the merged weights no longer hold the base's.

`params` selects leaves by name: top-level (`embed`, `lm_head`, `final_norm`) or
per-layer (`q_proj`, `attn_norm`, `q_bias`, ... see `PARAM_AXES`); None for all.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jft.errors import JftError
from jft.models import param_axes
from jft.peft.base import MethodBase, register


@dataclasses.dataclass(frozen=True)
class FullConfig:
    params: tuple[str, ...] | None = None

    def __post_init__(self):
        if isinstance(self.params, str):
            object.__setattr__(self, "params", (self.params,))
        elif isinstance(self.params, list):
            object.__setattr__(self, "params", tuple(self.params))


def select(base: dict, config: FullConfig) -> dict:
    """The selected leaves of `base`, in its tree layout (the arrays themselves)."""
    top = {k: v for k, v in base.items() if k != "layers"}
    layers = base["layers"]
    if config.params is None:
        return dict(top, layers=dict(layers))
    unknown = [n for n in config.params if n not in top and n not in layers]
    if unknown:
        valid = sorted(top) + sorted(layers)
        raise JftError(f"full fine-tuning param {unknown[0]!r} is not in this model; "
                       f"valid: {', '.join(valid)}")
    chosen = {k: v for k, v in top.items() if k in config.params}
    chosen["layers"] = {k: v for k, v in layers.items() if k in config.params}
    return chosen


class Full(MethodBase):
    name = "full"
    edits_base_weights = True
    Config = FullConfig

    def init(self, key, base, model, config, calibration_batches=None):
        return select(base, config)

    def layer_delta(self, delta, model, config):
        return {}  # edit_params swaps the layers in; the scan needs no second copy

    def edit_params(self, params, delta, model, config):
        out = dict(params, **{k: v for k, v in delta.items() if k != "layers"})
        out["layers"] = dict(params["layers"], **delta.get("layers", {}))
        return out

    def merge(self, base, delta, model, config):
        def cast(new, old):
            return new.astype(jnp.float32).astype(old.dtype)

        out = dict(base, **{k: cast(v, base[k]) for k, v in delta.items() if k != "layers"})
        out["layers"] = dict(base["layers"], **{k: cast(v, base["layers"][k])
                                                for k, v in delta.get("layers", {}).items()})
        return out

    def num_params(self, delta, model, config):
        return sum(math.prod(x.shape) for x in jax.tree.leaves(delta))

    def identity(self, delta, base, model, config):
        return select(base, config)

    def delta_axes(self, delta, model, config):
        return param_axes(delta, model)  # the delta is a subtree of the base


FULL = register(Full())
