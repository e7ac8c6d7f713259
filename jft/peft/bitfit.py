"""BitFit: train the biases of the targeted linears (Ben Zaken et al. 2022).

The delta is an additive bias per targeted linear, `layers[module]` [L, *out], zeros at
init and added to the linear's output. On a linear that has a bias (Qwen2's q/k/v) this
trains that bias (`b + delta`); on one without (Llama) it trains a new bias that starts
at zero. `merge` adds the delta into the base's bias leaves, creating the missing ones
(`q_bias`, `o_bias`, `gate_bias`, ... see `PARAM_AXES`): the forward adds any bias leaf
it finds, so a merged model needs no config change. `unmerge` subtracts it again and
drops the leaves the model's config says the base does not have.

Layers a module is not targeted on are masked to a zero bias (no gradient, not counted).
"""

from __future__ import annotations

import dataclasses
import math
from functools import cache

import jax.numpy as jnp
import numpy as np

from jft.models import ModelConfig
from jft.peft.base import (
    MethodBase,
    Targets,
    as_targets,
    layer_mask,
    module_axes,
    module_dims,
    register,
)


@dataclasses.dataclass(frozen=True)
class BitFitConfig:
    targets: Targets = Targets("all-linear")

    def __post_init__(self):
        object.__setattr__(self, "targets", as_targets(self.targets))


# ------------------------------------------------- bias leaves (shared with ssf.py)


def bias_name(module: str) -> str:
    """The params-tree leaf of a linear's bias: q_proj -> q_bias, down_proj -> down_bias."""
    return module.replace("_proj", "_bias")


def model_has_bias(model: ModelConfig, module: str) -> bool:
    """Whether the model's own (unmerged) params have this linear's bias."""
    if module in ("q_proj", "k_proj", "v_proj"):
        return model.qkv_bias
    if module == "o_proj":
        return model.o_bias
    return model.mlp_bias


def add_bias(layers: dict, module: str, delta: jnp.ndarray,
             weight_scale: jnp.ndarray | None = None) -> None:
    """layers[bias] = bias * weight_scale + delta in fp32 (the bias created as zeros in
    the weight's dtype when missing), cast back."""
    name = bias_name(module)
    existing = layers.get(name)
    dtype = existing.dtype if existing is not None else layers[module].dtype
    value = jnp.zeros(delta.shape, jnp.float32) if existing is None else existing.astype(
        jnp.float32)
    if weight_scale is not None:
        value = value * weight_scale
    layers[name] = (value + delta).astype(dtype)


def drop_created_bias(layers: dict, model: ModelConfig, module: str) -> None:
    """Removes a bias leaf that merge created (the model's config has none there)."""
    if not model_has_bias(model, module):
        layers.pop(bias_name(module), None)


def output_axes(module: str) -> tuple[str, ...]:
    """Logical axes of a stacked per-output-feature vector [L, *out] of a linear."""
    return ("layers", *module_axes(module)[1])


@cache
def active_layers(model: ModelConfig, targets: Targets) -> dict[str, np.ndarray]:
    return targets.resolve(model)


# ----------------------------------------------------------------------- method


class BitFit(MethodBase):
    name = "bitfit"
    Config = BitFitConfig

    def init(self, key, base, model, config, calibration_batches=None):
        layers = {
            module: jnp.zeros((model.num_layers, *module_dims(model, module)[1]), jnp.float32)
            for module in active_layers(model, config.targets)
        }
        return {"layers": layers}

    def linear_output(self, module, x, y, weight, bias, delta_layer, layer, config):
        if module not in delta_layer:
            return y
        on = jnp.asarray(active_layers(layer.config, config.targets)[module])[layer.index]
        extra = jnp.where(on, delta_layer[module].astype(jnp.float32), 0.0)
        return (y.astype(jnp.float32) + extra).astype(y.dtype)

    def merge(self, base, delta, model, config):
        return _fold(base, delta, model, config, sign=1.0)

    def unmerge(self, base, delta, model, config):
        return _fold(base, delta, model, config, sign=-1.0)

    def num_params(self, delta, model, config):
        return sum(math.prod(module_dims(model, module)[1]) * int(active.sum())
                   for module, active in active_layers(model, config.targets).items())

    def identity(self, delta, base, model, config):
        return {"layers": {m: jnp.zeros_like(v) for m, v in delta["layers"].items()}}

    def delta_axes(self, delta, model, config):
        return {"layers": {m: output_axes(m) for m in delta["layers"]}}


def _fold(base, delta, model, config, sign):
    layers = dict(base["layers"])
    for module, active in active_layers(model, config.targets).items():
        value = delta["layers"][module].astype(jnp.float32)
        add_bias(layers, module, sign * layer_mask(active, value.shape) * value)
        if sign < 0:
            drop_created_bias(layers, model, module)
    return dict(base, layers=layers)


BITFIT = register(BitFit())
