"""(IA)^3: learned vectors that rescale a linear's input or output (Liu et al. 2022).

PEFT's semantics: every targeted linear gets a vector initialised to ones. On a
*feedforward* module the vector scales the input features (`x * l` before the matmul);
on any other module it scales the output features, bias included (`(x W + b) * l`).
PEFT's defaults for Llama: targets k_proj, v_proj, down_proj, feedforward down_proj.

The delta: `layers[module]` [L, *in] (feedforward) or [L, *out] (otherwise), in jft's
head-split layout. Layers a module is not targeted on keep a scale of exactly one
(masked in the forward, so they get no gradient and do not count as trainable).

Stacked over other adapters, the input scaling applies to what the linear they form
reads and the output scaling to what it returns: merging in list order folds the same.
"""

from __future__ import annotations

import dataclasses
import math
import re
from functools import cache

import jax.numpy as jnp
import numpy as np

from jft.errors import JftError
from jft.models import ModelConfig
from jft.models.sites import declared_sites, linear_site
from jft.peft.base import MethodBase, Targets, as_targets, layer_mask, register


@dataclasses.dataclass(frozen=True)
class IA3Config:
    """targets: PEFT's target_modules (+ layers_to_transform); feedforward: PEFT's
    feedforward_modules, module names (matched, as PEFT does, as suffixes of paths like
    `model.layers.3.mlp.down_proj`) or one regex fullmatched against those paths."""

    targets: Targets = Targets(("k_proj", "v_proj", "down_proj"))
    feedforward: str | tuple[str, ...] = ("down_proj",)

    def __post_init__(self):
        object.__setattr__(self, "targets", as_targets(self.targets))
        if isinstance(self.feedforward, list):
            object.__setattr__(self, "feedforward", tuple(self.feedforward))
        if isinstance(self.feedforward, tuple):
            # Checked before there is a model: against every declared site.
            names = [site.name for site in declared_sites()]
            unknown = [m for m in self.feedforward if m not in names]
            if unknown:
                raise JftError(f"unknown ia3 feedforward module {unknown[0]!r}; valid: "
                               f"{', '.join(names)} or a regex")
            modules = self.targets.modules
            if isinstance(modules, tuple) and not set(self.feedforward) <= set(modules):
                extra = sorted(set(self.feedforward) - set(modules))
                raise JftError(f"ia3 feedforward modules {extra} are not among the targets "
                               f"{list(modules)}; feedforward must be a subset of targets")


@dataclasses.dataclass(frozen=True)
class ModulePlan:
    active: tuple[bool, ...]  # [L]: targeted on that layer
    feedforward: bool  # scales the input (True) or the output (False)

    def mask(self) -> np.ndarray:
        return np.asarray(self.active)


def _is_feedforward(config: IA3Config, model: ModelConfig, module: str, layer: int) -> bool:
    path = linear_site(model, module).path(layer)
    if isinstance(config.feedforward, str):
        return re.fullmatch(config.feedforward, path) is not None
    return any(path.endswith(name) for name in config.feedforward)


@cache
def plan(model: ModelConfig, config: IA3Config) -> dict[str, ModulePlan]:
    """Targeted modules, the layers they are targeted on, and which side they scale."""
    plans = {}
    for module, active in config.targets.resolve(model).items():
        kinds = {_is_feedforward(config, model, module, i)
                 for i in range(model.num_layers) if active[i]}
        if len(kinds) > 1:
            raise JftError(f"ia3 feedforward {config.feedforward!r} matches {module} on some "
                           "targeted layers but not others; it must match all or none")
        plans[module] = ModulePlan(tuple(bool(a) for a in active), kinds.pop())
    return plans


def _dims(model: ModelConfig, module: str, p: ModulePlan) -> tuple[int, ...]:
    dims_in, dims_out = linear_site(model, module).dims(model)
    return dims_in if p.feedforward else dims_out


def _effective(scale, active: np.ndarray):
    """Stacked [L, ...] scales with untargeted layers pinned to exactly one."""
    mask = layer_mask(active, scale.shape)
    return 1.0 + mask * (scale.astype(jnp.float32) - 1.0)


class Ia3(MethodBase):
    name = "ia3"
    Config = IA3Config

    def init(self, key, base, model, config, calibration_batches=None):
        layers = {
            module: jnp.ones((model.num_layers, *_dims(model, module, p)), jnp.float32)
            for module, p in plan(model, config).items()
        }
        return {"layers": layers}

    def _layer_scale(self, module, delta_layer, layer, config):
        p = plan(layer.config, config)[module]
        on = jnp.asarray(p.mask())[layer.index]
        scale = delta_layer[module].astype(jnp.float32)
        return p, jnp.where(on, scale, 1.0)

    def wraps_linear(self, site, delta, delta_layer, config):
        return site.name in delta_layer

    def linear(self, site, x, inner, delta, delta_layer, layer, config):
        p, scale = self._layer_scale(site.name, delta_layer, layer, config)
        if p.feedforward:  # scales what the wrapped linear reads
            return inner((x.astype(jnp.float32) * scale).astype(x.dtype))
        y = inner(x)
        return (y.astype(jnp.float32) * scale).astype(y.dtype)

    def merge(self, base, delta, model, config):
        return _fold(base, delta, model, config, invert=False)

    def unmerge(self, base, delta, model, config):
        return _fold(base, delta, model, config, invert=True)

    def num_params(self, delta, model, config):
        return sum(math.prod(_dims(model, module, p)) * sum(p.active)
                   for module, p in plan(model, config).items())

    def identity(self, delta, base, model, config):
        return {"layers": {m: jnp.ones_like(v) for m, v in delta["layers"].items()}}

    def delta_axes(self, delta, model, config):
        plans = plan(model, config)
        axes = {m: linear_site(model, m) for m in delta["layers"]}
        return {"layers": {m: ("layers", *(site.in_axes if plans[m].feedforward
                                           else site.out_axes))
                           for m, site in axes.items()}}


def _fold(base, delta, model, config, invert: bool):
    """W * l on the scaled side (and the bias, for output scaling); / l to undo."""
    layers = dict(base["layers"])
    for module, p in plan(model, config).items():
        site = linear_site(model, module)
        dims_in, dims_out = site.dims(model)
        scale = _effective(delta["layers"][module], p.mask())  # [L, *side]
        if invert:
            scale = 1.0 / scale
        if p.feedforward:
            shape = (model.num_layers, *dims_in, *([1] * len(dims_out)))
        else:
            shape = (model.num_layers, *([1] * len(dims_in)), *dims_out)
        weight = base["layers"][module]
        scaled = site.to_in_out(weight.astype(jnp.float32), lead=1) * scale.reshape(shape)
        layers[module] = site.from_in_out(scaled, lead=1).astype(weight.dtype)
        if not p.feedforward and site.bias in layers:
            bias = layers[site.bias]
            layers[site.bias] = (bias.astype(jnp.float32) * scale).astype(bias.dtype)
    return dict(base, layers=layers)


IA3 = register(Ia3())
