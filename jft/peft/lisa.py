"""LISA (Layerwise Importance Sampled AdamW; Pan et al. 2024, LMFlow): a few whole decoder
layers trained at a time, resampled every few steps.

`activated_layers` (γ, LMFlow's `lisa_activated_layers`) decoder layers are drawn
uniformly without replacement at init and again every `interval_steps` optimiser steps
(`lisa_interval_steps`); every param of an active layer trains (linears, norms, biases).
The embeddings, the LM head (if untied) and the final norm always train, as in LMFlow,
whose callback never freezes them.

The delta (layout in `active_layers.py`): `parked` {name: [L, ...]} every layer param,
`active` {name: [γ, ...]} float32, `active_layers` int32 [γ], and float32 `embed`,
`final_norm` (and `lm_head`) swapped in by `edit_params`. At a switch the active layers'
values go back into `parked` and their optimiser state restarts; the always-trained
top-level params keep theirs. `num_params` counts what trains at a time.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jft.errors import JftError
from jft.peft.active_layers import TOP_LEVEL, ActiveLayersMethod, gather, switch
from jft.peft.base import numpy_rng, register


@dataclasses.dataclass(frozen=True)
class LisaConfig:
    activated_layers: int = 2
    interval_steps: int = 20

    def __post_init__(self):
        for name in ("activated_layers", "interval_steps"):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
                raise JftError(f"lisa {name} must be a positive integer, got {value!r}")


def sample_layers(key, num_layers: int, count: int) -> jnp.ndarray:
    """`count` distinct layer indices, uniformly at random, sorted (int32)."""
    chosen = numpy_rng(key).choice(num_layers, count, replace=False)
    return jnp.asarray(np.sort(chosen), jnp.int32)


class Lisa(ActiveLayersMethod):
    name = "lisa"
    Config = LisaConfig

    def init(self, key, base, model, config, calibration_batches=None):
        if config.activated_layers > model.num_layers:
            raise JftError(f"lisa activated_layers must be in 1..{model.num_layers} (the "
                           f"model's decoder layers), got {config.activated_layers}")
        layers = sample_layers(key, model.num_layers, config.activated_layers)
        parked = dict(base["layers"])
        delta = {
            "parked": parked,
            "active": {name: gather(w, layers) for name, w in parked.items()},
            "active_layers": layers,
        }
        delta |= {k: base[k].astype(jnp.float32) for k in TOP_LEVEL if k in base}
        return delta

    def refresh(self, delta, step, total_steps, key, model, config):
        layers = sample_layers(key, model.num_layers, config.activated_layers)
        return switch(delta, layers)


LISA = register(Lisa())
