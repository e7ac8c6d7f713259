"""BitFit: train the biases of the targeted linears (Ben Zaken et al. 2022).

The delta is an additive bias per targeted linear, `layers[module]` [L, *out], zeros at
init and added to the linear's output. On a linear that has a bias (Qwen2's q/k/v) this
trains that bias (`b + delta`); on one without (Llama) it trains a new bias that starts
at zero. `merge` adds the delta into the base's bias leaves, creating the missing ones
(each site's bias key: `q_bias`, `o_bias`, `gate_bias`, ...): the forward adds any bias leaf
it finds, so a merged model needs no config change. `unmerge` subtracts it again and
drops the leaves the model's config says the base does not have.

Layers a module is not targeted on are masked to a zero bias (no gradient, not counted).
"""

from __future__ import annotations

import dataclasses
from functools import cache

import jax.numpy as jnp
import numpy as np

from jft.errors import JftError
from jft.models import ModelConfig
from jft.models.sites import linear_site
from jft.peft.base import MethodBase, Targets, as_targets, layer_mask, register


@dataclasses.dataclass(frozen=True)
class BitFitConfig:
    targets: Targets = Targets("all-linear")

    def __post_init__(self):
        object.__setattr__(self, "targets", as_targets(self.targets))


# ------------------------------------------------- bias leaves (shared with ssf.py)


def add_bias(layers: dict, model: ModelConfig, module: str, delta: jnp.ndarray,
             weight_scale: jnp.ndarray | None = None) -> None:
    """layers[bias] = bias * weight_scale + delta in fp32 (the bias created as zeros in
    the weight's dtype when missing), cast back."""
    name = linear_site(model, module).bias
    if name is None:
        raise JftError(f"{module} declares no bias key (LinearSite.bias) to merge into")
    existing = layers.get(name)
    dtype = existing.dtype if existing is not None else layers[module].dtype
    value = jnp.zeros(delta.shape, jnp.float32) if existing is None else existing.astype(
        jnp.float32)
    if weight_scale is not None:
        value = value * weight_scale
    layers[name] = (value + delta).astype(dtype)


def drop_created_bias(layers: dict, model: ModelConfig, module: str) -> None:
    """Removes a bias leaf that merge created (the model's config has none there)."""
    site = linear_site(model, module)
    if not site.has_bias(model):
        layers.pop(site.bias, None)


def output_axes(model: ModelConfig, module: str) -> tuple[str, ...]:
    """Logical axes of a stacked per-output-feature vector [L, *out] of a linear."""
    return linear_site(model, module).bias_axes


@cache
def active_layers(model: ModelConfig, targets: Targets) -> dict[str, np.ndarray]:
    return targets.resolve(model)


# ----------------------------------------------------------------------- method


class BitFit(MethodBase):
    name = "bitfit"
    Config = BitFitConfig

    def init(self, key, base, model, config, calibration_batches=None):
        layers = {
            module: jnp.zeros((model.num_layers, *linear_site(model, module).dims(model)[1]),
                              jnp.float32)
            for module in active_layers(model, config.targets)
        }
        return {"layers": layers}

    def wraps_linear(self, site, delta, delta_layer, config):
        return site.name in delta_layer

    def linear(self, site, x, inner, delta, delta_layer, layer, config):
        y = inner(x)
        on = jnp.asarray(active_layers(layer.config, config.targets)[site.name])[layer.index]
        extra = jnp.where(on, delta_layer[site.name].astype(jnp.float32), 0.0)
        return (y.astype(jnp.float32) + extra).astype(y.dtype)

    def merge(self, base, delta, model, config):
        return _fold(base, delta, model, config, sign=1.0)

    def unmerge(self, base, delta, model, config):
        return _fold(base, delta, model, config, sign=-1.0)

    def num_params(self, delta, model, config):
        return sum(linear_site(model, module).sizes(model)[1] * int(active.sum())
                   for module, active in active_layers(model, config.targets).items())

    def identity(self, delta, base, model, config):
        return {"layers": {m: jnp.zeros_like(v) for m, v in delta["layers"].items()}}

    def delta_axes(self, delta, model, config):
        return {"layers": {m: output_axes(model, m) for m in delta["layers"]}}


def _fold(base, delta, model, config, sign):
    layers = dict(base["layers"])
    for module, active in active_layers(model, config.targets).items():
        value = delta["layers"][module].astype(jnp.float32)
        add_bias(layers, model, module, sign * layer_mask(active, value.shape) * value)
        if sign < 0:
            drop_created_bias(layers, model, module)
    return dict(base, layers=layers)


BITFIT = register(BitFit())
