"""SSF: scale and shift the features after each targeted linear (Lian et al. 2022).

y' = y * scale + shift, per output feature (`y` with the linear's bias, if any). The
delta, per targeted module: `scale` [L, *out] (ones) and `shift` [L, *out] (zeros).
`merge` folds it into the linear: W' = W * scale, b' = b * scale + shift, creating the
bias leaf where the model has none (the forward adds any bias leaf it finds). `unmerge`
inverts that exactly and drops the bias leaves the model's config does not have.

Layers a module is not targeted on are masked to scale 1, shift 0.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jft.models.sites import linear_site
from jft.peft.base import MethodBase, Targets, as_targets, layer_mask, register
from jft.peft.bitfit import active_layers, add_bias, drop_created_bias, output_axes


@dataclasses.dataclass(frozen=True)
class SsfConfig:
    targets: Targets = Targets("all-linear")

    def __post_init__(self):
        object.__setattr__(self, "targets", as_targets(self.targets))


class Ssf(MethodBase):
    name = "ssf"
    Config = SsfConfig

    def init(self, key, base, model, config, calibration_batches=None):
        layers = {}
        for module in active_layers(model, config.targets):
            shape = (model.num_layers, *linear_site(model, module).dims(model)[1])
            layers[module] = {"scale": jnp.ones(shape, jnp.float32),
                              "shift": jnp.zeros(shape, jnp.float32)}
        return {"layers": layers}

    def wraps_linear(self, site, delta, delta_layer, config):
        return site.name in delta_layer

    def linear(self, site, x, inner, delta, delta_layer, layer, config):
        y = inner(x)
        on = jnp.asarray(active_layers(layer.config, config.targets)[site.name])[layer.index]
        entry = delta_layer[site.name]
        scale = jnp.where(on, entry["scale"].astype(jnp.float32), 1.0)
        shift = jnp.where(on, entry["shift"].astype(jnp.float32), 0.0)
        return (y.astype(jnp.float32) * scale + shift).astype(y.dtype)

    def merge(self, base, delta, model, config):
        layers = dict(base["layers"])
        for module, (scale, shift, out_shape) in _effective(delta, model, config).items():
            site = linear_site(model, module)
            weight = layers[module]
            scaled = site.to_in_out(weight.astype(jnp.float32), lead=1) * scale.reshape(out_shape)
            layers[module] = site.from_in_out(scaled, lead=1).astype(weight.dtype)
            add_bias(layers, model, module, shift, weight_scale=scale)
        return dict(base, layers=layers)

    def unmerge(self, base, delta, model, config):
        layers = dict(base["layers"])
        for module, (scale, shift, out_shape) in _effective(delta, model, config).items():
            site = linear_site(model, module)
            weight = layers[module]
            scaled = site.to_in_out(weight.astype(jnp.float32), lead=1) / scale.reshape(out_shape)
            layers[module] = site.from_in_out(scaled, lead=1).astype(weight.dtype)
            name = site.bias
            bias = layers[name]  # merge created it if the base had none
            layers[name] = ((bias.astype(jnp.float32) - shift) / scale).astype(bias.dtype)
            drop_created_bias(layers, model, module)
        return dict(base, layers=layers)

    def num_params(self, delta, model, config):
        return sum(2 * linear_site(model, module).sizes(model)[1] * int(active.sum())
                   for module, active in active_layers(model, config.targets).items())

    def identity(self, delta, base, model, config):
        return {"layers": {m: {"scale": jnp.ones_like(e["scale"]),
                               "shift": jnp.zeros_like(e["shift"])}
                           for m, e in delta["layers"].items()}}

    def delta_axes(self, delta, model, config):
        return {"layers": {m: {"scale": output_axes(model, m), "shift": output_axes(model, m)}
                           for m in delta["layers"]}}


def _effective(delta, model, config):
    """module -> (scale, shift) [L, *out] in fp32 with untargeted layers masked to the
    identity, and the shape that broadcasts the scale over the weight's output axes."""
    out = {}
    for module, active in active_layers(model, config.targets).items():
        entry = delta["layers"][module]
        mask = layer_mask(active, entry["scale"].shape)
        scale = 1.0 + mask * (entry["scale"].astype(jnp.float32) - 1.0)
        shift = mask * entry["shift"].astype(jnp.float32)
        dims_in, dims_out = linear_site(model, module).dims(model)
        out[module] = (scale, shift, (model.num_layers, *([1] * len(dims_in)), *dims_out))
    return out


SSF = register(Ssf())
