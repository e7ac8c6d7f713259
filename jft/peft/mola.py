"""MoLA, "Higher Layers Need More LoRA Experts" (Gao et al. 2024, arXiv 2402.08562):
every targeted linear gets a router and a few LoRA experts, more of them in higher layers.

At a targeted linear of layer l with E_l experts:

    h = W0 x + Σ_{i ∈ top-k} p̂_i (alpha / r) dropout(x) A_i B_i

p = softmax(x W_r) over the layer's E_l experts (W_r [*in, E_l], no bias, Kaiming-uniform
with a = √5 as the reference code initialises it, trainable), its top k kept and
renormalised to sum to 1 (p̂). Each A_i is Kaiming-uniform and each B_i zero, so the
adapter starts as the identity.

`experts_per_layer` sets E_l: one int for every layer; one entry per layer; or a shorter
list of group counts spread evenly over the layers, layer l taking entry
floor(l G / L) of the G entries (the default (2, 4, 6, 8) is the paper's "△" / 2468
allocation: 2 experts in the first quarter of the layers, ..., 8 in the last).

The delta, per targeted module: `router` [L, *in, E], `a` [L, E, *in, r], `b`
[L, E, r, *out], E the most experts any layer has. A layer with fewer experts masks the
rest: their router logits are -inf (never chosen, probability 0), their factors and router
columns stay zero, get no gradient and do not count as parameters. The experts of one
linear are few and low-rank, so they run densely: x A for all of them ([B, T, E, r]),
weighted by p̂ (zero off the top k), then through B.

The paper's optional balance loss (off by default there) is left out: a linear's hook
returns only its output. Routing per token makes merging impossible: `merge` refuses.
"""

from __future__ import annotations

import dataclasses
import math
from functools import cache

import jax
import jax.numpy as jnp
import numpy as np

from jft.errors import ConfigValueError, JftError
from jft.models import ModelConfig
from jft.models.moe import route
from jft.models.sites import LinearSite, linear_site, site_index
from jft.peft.base import MethodBase, Targets, as_targets, register


@dataclasses.dataclass(frozen=True)
class MolaConfig:
    """The reference code's defaults: r 8, alpha 16, dropout 0.05, top-2, all seven
    linears, experts 2/4/6/8 over the four quarters of the layers."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    top_k: int = 2
    experts_per_layer: int | tuple[int, ...] = (2, 4, 6, 8)
    targets: Targets = Targets("all-linear")

    def __post_init__(self):
        object.__setattr__(self, "targets", as_targets(self.targets))
        counts = self.experts_per_layer
        if isinstance(counts, list):
            counts = tuple(counts)
            object.__setattr__(self, "experts_per_layer", counts)
        for name in ("r", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise JftError(f"mola {name} must be a positive integer, got {value!r}")
        items = counts if isinstance(counts, tuple) else (counts,)
        if not items or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                            for n in items):
            raise JftError("mola experts_per_layer must be a positive integer or a non-empty "
                           f"list of them, got {counts!r}")
        if min(items) < self.top_k:
            raise JftError(f"mola experts_per_layer {counts!r} has a layer with "
                           f"{min(items)} experts, fewer than top_k {self.top_k}")
        for name in ("alpha", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
                    value) or value < 0:
                raise JftError(f"mola {name} must be a finite number >= 0, got {value!r}")
        if self.dropout >= 1.0:
            raise JftError(f"mola dropout must be in [0, 1), got {self.dropout}")


def layer_experts(config: MolaConfig, num_layers: int) -> tuple[int, ...]:
    """E_l for every layer, from `experts_per_layer` (see the module's docstring)."""
    counts = config.experts_per_layer
    if isinstance(counts, int):
        return (counts,) * num_layers
    if len(counts) == num_layers:
        return counts
    if len(counts) > num_layers:
        raise ConfigValueError("method.experts_per_layer",
                               f"mola experts_per_layer has {len(counts)} entries for a model "
                               f"of {num_layers} layers; give one per layer, or fewer (groups "
                               "spread evenly over the layers)")
    return tuple(counts[layer * len(counts) // num_layers] for layer in range(num_layers))


@dataclasses.dataclass(frozen=True)
class ModulePlan:
    """Experts per layer of one targeted module (0: not targeted there)."""

    experts: tuple[int, ...]

    @property
    def max_experts(self) -> int:
        return max(self.experts)

    def present(self) -> np.ndarray:  # [L, E]: the layer has that expert
        return np.arange(self.max_experts)[None, :] < np.asarray(self.experts)[:, None]

    def active(self) -> np.ndarray:  # [L]
        return np.asarray(self.experts) > 0


@cache
def plan(model: ModelConfig, config: MolaConfig) -> dict[str, ModulePlan]:
    """Targeted modules with their experts per layer, checked against the model."""
    counts = layer_experts(config, model.num_layers)
    plans = {}
    for module, active in config.targets.resolve(model).items():
        site = linear_site(model, module)
        limit = min(site.sizes(model))
        if config.r > limit:
            raise ConfigValueError("method.r", f"mola r {config.r} exceeds the smaller "
                                               f"dimension {limit} of {module}")
        plans[module] = ModulePlan(tuple(n if on else 0 for n, on in zip(counts, active,
                                                                          strict=True)))
    return plans


def _expert_letter(site: LinearSite) -> str:
    """A letter the site's einsum does not use, for the experts' axis."""
    return next(c for c in "XYZWQPOMLJIG" if c not in site.equation)


def _equations(site: LinearSite) -> tuple[str, str, str]:
    """(router logits, x A per expert, (x A) B summed over experts) einsums."""
    e, lead, dims_in, dims_out = _expert_letter(site), site.lead, site.in_letters, site.out_letters
    return (f"{lead}{dims_in},{dims_in}{e}->{lead}{e}",
            f"{lead}{dims_in},{e}{dims_in}r->{lead}{e}r",
            f"{lead}{e}r,{e}r{dims_out}->{lead}{dims_out}")


def _expert_mask(present: np.ndarray, ndim: int) -> jax.Array:
    """[L, E] presence shaped to broadcast against a [L, E, ...] factor."""
    return jnp.asarray(present, jnp.float32).reshape(*present.shape, *([1] * (ndim - 2)))


class Mola(MethodBase):
    name = "mola"
    Config = MolaConfig

    def init(self, key, base, model, config, calibration_batches=None):
        layers = {}
        for module, p in plan(model, config).items():
            key, router_key, a_key = jax.random.split(key, 3)
            site = linear_site(model, module)
            dims_in, dims_out = site.dims(model)
            num_layers, experts = model.num_layers, p.max_experts
            # Kaiming-uniform with a = sqrt(5): bound 1 / sqrt(fan_in), router and A alike.
            bound = 1.0 / math.sqrt(math.prod(dims_in))
            router = jax.random.uniform(router_key, (num_layers, *dims_in, experts),
                                        minval=-bound, maxval=bound)
            router = router * jnp.asarray(p.present(), jnp.float32).reshape(
                num_layers, *([1] * len(dims_in)), experts)
            a = jax.random.uniform(a_key, (num_layers, experts, *dims_in, config.r),
                                   minval=-bound, maxval=bound)
            a = a * _expert_mask(p.present(), a.ndim)
            b = jnp.zeros((num_layers, experts, config.r, *dims_out))
            layers[module] = {"router": router, "a": a, "b": b}
        return {"layers": layers}

    def wraps_linear(self, site, delta, delta_layer, config):
        return site.name in delta_layer

    def linear(self, site, x, inner, delta, delta_layer, layer, config):
        p = plan(layer.config, config)[site.name]
        entry = delta_layer[site.name]
        y = inner(x)
        on = jnp.asarray(p.active())[layer.index]
        present = jnp.asarray(p.present())[layer.index] | ~on  # [E]; all on untargeted layers
        to_logits, shrink, expand = _equations(site)
        logits = jnp.einsum(to_logits, x.astype(jnp.float32),
                            entry["router"].astype(jnp.float32))  # [B, T, E]
        logits = jnp.where(present, logits, -jnp.inf)
        lead = logits.shape[:-1]
        routing = route(logits.reshape(-1, p.max_experts), config.top_k, True, x.dtype)
        weights = jnp.sum(jax.nn.one_hot(routing.experts, p.max_experts, dtype=x.dtype)
                          * routing.weights[..., None], axis=1).reshape(*lead, -1)  # [B, T, E]
        x_in = x
        if config.dropout and layer.rng is not None:
            key = jax.random.fold_in(layer.rng, site_index(layer.config, site))
            keep = jax.random.bernoulli(key, 1.0 - config.dropout, x.shape)
            x_in = jnp.where(keep, x / (1.0 - config.dropout), 0).astype(x.dtype)
        xa = jnp.einsum(shrink, x_in, entry["a"].astype(x.dtype))  # [B, T, E, r]
        scale = jnp.asarray(config.alpha / config.r, x.dtype)
        update = jnp.einsum(expand, xa * weights[..., None], entry["b"].astype(x.dtype)) * scale
        return y + jnp.where(on, update, 0).astype(y.dtype)

    def merge(self, base, delta, model, config):
        raise JftError(f"mola cannot be merged into the base: each token's top-{config.top_k} "
                       "LoRA experts are chosen by a router at every linear, which no single "
                       "weight can express; keep it as an adapter (export --format jft)")

    def unmerge(self, base, delta, model, config):
        raise JftError("mola is never merged into a base (routing), so it cannot be "
                       "unmerged; keep the base as it is")

    def num_params(self, delta, model, config):
        total = 0
        for module, p in plan(model, config).items():
            size_in, size_out = linear_site(model, module).sizes(model)
            total += sum(p.experts) * (config.r * (size_in + size_out) + size_in)
        return total

    def identity(self, delta, base, model, config):
        return {"layers": {m: dict(e, b=jnp.zeros_like(e["b"]))
                           for m, e in delta["layers"].items()}}

    def delta_axes(self, delta, model, config):
        # Factors shard like their weight's inputs and outputs; experts and rank replicate.
        layers = {}
        for module in delta["layers"]:
            site = linear_site(model, module)
            layers[module] = {"router": ("layers", *site.in_axes, None),
                              "a": ("layers", None, *site.in_axes, None),
                              "b": ("layers", None, None, *site.out_axes)}
        return {"layers": layers}


MOLA = register(Mola())
