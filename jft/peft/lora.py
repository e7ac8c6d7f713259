"""LoRA, rsLoRA and DoRA: y = x W + s (x A) B, with s = alpha / r (or alpha / sqrt(r)).

The delta, per targeted module: `a` [L, *in, r] and `b` [L, r, *out] (PEFT's lora_A
and lora_B, transposed into jft's [in, out] layout), and for DoRA a `magnitude`
[L, *out]. Modules whose rank differs by layer (`rank_pattern`, EVA's redistribution)
are padded to their largest rank, the padding masked out.

Inits (`init`): `default` (PEFT's: Kaiming-uniform A, zero B) and `gaussian` (normal A
with std 1/r, zero B) live here; the data-driven ones (PiSSA, EVA, CorDA, LoRA-GA) are
in `lora_inits.py`. An init that rewrites the base (PiSSA, CorDA, LoRA-GA) leaves it
alone: the delta records the initial factors as `init_a` / `init_b` (not trainable), and
`rebase` gives W - s A0 B0, so that merge and export stay exact. LoftQ (`loftq`, for a
quantized base) rewrites the base as it is quantized (`lora_inits.loftq_params`): its
delta records A0, B0 too, and `rebase` keeps a quantized base as it is (it is Q).

In a stack of adapters LoRA adds s (x A) B to the output of the linear it wraps; over
the plain base linear that is one fused kernel under `kernels: pallas`. DoRA rescales
the weight of what it wraps (`_dora`), so stacking always equals merging in list order.
"""

from __future__ import annotations

import dataclasses
import math
import re
from functools import cache
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jft.errors import ConfigValueError, JftError
from jft.models import ModelConfig
from jft.models.sites import LinearSite, linear_site, site_index
from jft.peft.base import MethodBase, Targets, as_targets, register, use_kernel
from jft.quant.params import is_quantized_tree
from jft.quant.tensor import is_quantized

INITS = ("default", "gaussian", "pissa", "eva", "corda", "loraga", "loftq")
DATA_DRIVEN_INITS = ("eva", "corda", "loraga")  # PiSSA needs only the weights


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: float = 8.0
    targets: Targets = Targets()
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    init: str = "default"
    # PEFT's rank_pattern / alpha_pattern: (regex or module name, value) pairs, matched
    # against paths like `model.layers.3.self_attn.q_proj` (a plain name matches the end).
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    # Options of the data-driven inits (see lora_inits.py).
    init_options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        for name in ("rank_pattern", "alpha_pattern", "init_options"):
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, tuple(sorted(value.items())))
        object.__setattr__(self, "targets", as_targets(self.targets))
        if self.r < 1:
            raise JftError(f"lora r must be a positive integer, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise JftError(f"lora dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INITS:
            raise JftError(f"unknown lora init {self.init!r}; valid: {', '.join(INITS)}")


@dataclasses.dataclass(frozen=True)
class ModulePlan:
    """Per-layer rank and scale of one targeted module (rank 0: not targeted there)."""

    ranks: tuple[int, ...]
    scales: tuple[float, ...]

    @property
    def max_rank(self) -> int:
        return max(self.ranks)

    def rank_mask(self) -> np.ndarray:  # [L, r]
        return np.arange(self.max_rank)[None, :] < np.asarray(self.ranks)[:, None]


@cache
def plan(model: ModelConfig, config: LoraConfig) -> dict[str, ModulePlan]:
    """Targeted modules with per-layer ranks and scales, checked against the model."""
    plans = {}
    for module, active in config.targets.resolve(model).items():
        site = linear_site(model, module)
        if site.experts and (config.dora or config.init not in ("default", "gaussian")):
            option = "dora" if config.dora else "init"
            raise ConfigValueError(f"method.{option}",
                                   f"{module} is a stack of experts: LoRA on it has per-expert "
                                   f"factors, without DoRA or data-driven inits (PEFT's "
                                   f"target_parameters has neither); target it with plain LoRA")
        ranks, scales = [], []
        for layer in range(model.num_layers):
            path = site.path(layer)
            r = _pattern_value(config.rank_pattern, path, module, config.r) if active[layer] else 0
            alpha = _pattern_value(config.alpha_pattern, path, module, config.alpha)
            # An SVD-based init has only min(in, out) directions to give; plain LoRA (as in
            # PEFT) may exceed that, redundantly (Qwen2-MoE's one-output shared-expert gate).
            limit = min(site.sizes(model))
            if r > limit and config.init not in ("default", "gaussian"):
                raise JftError(f"lora rank {r} for {path} exceeds its smaller dimension {limit}")
            ranks.append(r)
            scales.append(0.0 if r == 0 else alpha / (math.sqrt(r) if config.rslora else r))
        plans[module] = ModulePlan(tuple(ranks), tuple(scales))
    return plans


def _pattern_value(pattern, path: str, module: str, default):
    # PEFT's rule: a key matches a module path that ends with it, as a regex.
    for key, value in pattern:
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def low_rank_product(a: jax.Array, b: jax.Array) -> jax.Array:
    """A @ B in the base weight's layout: [*in, r] x [r, *out] -> [*in, *out]."""
    return jnp.tensordot(a, b, axes=1)


class Lora(MethodBase):
    name = "lora"
    Config = LoraConfig
    targets_experts = True

    def reads_base_weights(self, config) -> bool:
        return config.dora or config.init not in ("default", "gaussian")

    def init(self, key, base, model, config, calibration_batches=None):
        if config.init not in ("default", "gaussian"):
            from jft.peft import lora_inits

            return lora_inits.init(key, base, model, config, calibration_batches)
        layers = {}
        for module, p in plan(model, config).items():
            key, a_key = jax.random.split(key)
            site = linear_site(model, module)
            dims_in, dims_out = site.dims(model)
            group = site.group_shape(model)  # experts: one pair of factors each
            shape_a = (model.num_layers, *group, *dims_in, p.max_rank)
            if config.init == "gaussian":
                a = jax.random.normal(a_key, shape_a) / config.r
            else:  # Kaiming-uniform with a = sqrt(5): bound 1 / sqrt(fan_in)
                bound = 1.0 / math.sqrt(math.prod(dims_in))
                a = jax.random.uniform(a_key, shape_a, minval=-bound, maxval=bound)
            a = a * _broadcast(p.rank_mask(), len(group) + len(dims_in))
            entry = {"a": a, "b": jnp.zeros((model.num_layers, *group, p.max_rank, *dims_out))}
            if config.dora:
                entry["magnitude"] = _column_norm(site, base["layers"][module])
            layers[module] = entry
        return {"layers": layers}

    def wraps_linear(self, site, delta, delta_layer, config):
        return site.name in delta_layer

    def linear(self, site, x, inner, delta, delta_layer, layer, config):
        p = plan(layer.config, config)[site.name]
        entry = delta_layer[site.name]
        dropout = bool(config.dropout and layer.rng is not None)
        if inner.is_plain and _fused(layer, config, site.experts):
            return _fused_linear(site, x, inner, entry, p, layer)
        y = inner(x)
        a, b = entry["a"].astype(x.dtype), entry["b"].astype(x.dtype)
        scale = jnp.asarray(p.scales, x.dtype)[layer.index]
        x_in = x
        if dropout:
            key = jax.random.fold_in(layer.rng, site_index(layer.config, site))
            keep = jax.random.bernoulli(key, 1.0 - config.dropout, x.shape)
            x_in = jnp.where(keep, x / (1.0 - config.dropout), 0).astype(x.dtype)
        xa = site.shrink(x_in, a, inner.groups)  # [B, T, r]
        xa = xa * jnp.asarray(p.rank_mask(), x.dtype)[layer.index]
        lora = site.expand(xa, b, inner.groups) * scale  # [B, T, *out]
        if not config.dora:
            return y + lora
        ratio, wx = _dora(site, x, x_in, y, inner, entry, p, a, b, scale, dropout, layer)
        return y + (ratio - 1) * wx + ratio * lora

    def needs_calibration(self, config):
        return config.init in DATA_DRIVEN_INITS

    def init_with_config(self, key, base, model, config, calibration_batches=None):
        if config.init == "eva":  # EVA's rank redistribution settles per-layer ranks
            from jft.peft import lora_inits

            return lora_inits.init_eva(key, base, model, config, calibration_batches)
        return config, self.init(key, base, model, config, calibration_batches)

    def rebase(self, base, delta, model, config):
        """The base an init rewrote (PiSSA, CorDA, LoRA-GA): W - s A0 B0, from the initial
        factors the delta records as `init_a` / `init_b`. Other inits leave it alone.
        LoftQ's rewritten base is the quantized Q `lora_inits.loftq_params` made, kept as
        it is; over the float base it was made from, it is W - s A0 B0 as for PiSSA."""
        recorded = {m: e for m, e in delta["layers"].items() if "init_a" in e}
        if not recorded:
            return base
        if config.init == "loftq" and any(is_quantized(base["layers"][m]) for m in recorded):
            return base
        if is_quantized_tree(base):
            raise JftError(f"init: {config.init} rewrites the base's weights, which are "
                           "quantized here; use init: loftq (made for a quantized base) or "
                           "quantize: none")
        initial = {"layers": {m: {"a": e["init_a"], "b": e["init_b"]} for m, e in recorded.items()}}
        sub_config = dataclasses.replace(config, dora=False, targets=Targets(tuple(recorded)))
        return _fold(base, initial, model, sub_config, sign=-1.0)

    def trainable(self, delta, config):
        return {"layers": {
            module: {name: not name.startswith("init_") for name in entry}
            for module, entry in delta["layers"].items()
        }}

    def merge(self, base, delta, model, config):
        return _fold(base, delta, model, config, sign=1.0)

    def unmerge(self, base, delta, model, config):
        if config.dora:
            return super().unmerge(base, delta, model, config)
        return _fold(base, delta, model, config, sign=-1.0)

    def num_params(self, delta, model, config):
        total = 0
        for module, p in plan(model, config).items():
            site = linear_site(model, module)
            size_in, size_out = site.sizes(model)
            experts = math.prod(site.group_shape(model))
            total += experts * sum(r * (size_in + size_out) for r in p.ranks)
            if config.dora:
                total += size_out * sum(r > 0 for r in p.ranks)
        return total

    def identity(self, delta, base, model, config):
        layers = {}
        for module, entry in delta["layers"].items():
            entry = dict(entry, b=jnp.zeros_like(entry["b"]))  # init_a / init_b are kept
            if "magnitude" in entry:
                entry["magnitude"] = _column_norm(linear_site(model, module),
                                                  base["layers"][module])
            layers[module] = entry
        return {"layers": layers}

    def delta_axes(self, delta, model, config):
        # A shards like W's inputs, B like its outputs, DoRA's magnitude like its output
        # columns; the rank is small and stays replicated.
        layers = {}
        for module, entry in delta["layers"].items():
            site = linear_site(model, module)
            group = site.group_axes
            a, b = ("layers", *group, *site.in_axes, None), ("layers", *group, None, *site.out_axes)
            by_name = {"a": a, "init_a": a, "b": b, "init_b": b,
                       "magnitude": site.bias_axes}
            layers[module] = {name: by_name[name] for name in entry}
        return {"layers": layers}


def _fused(layer, config, experts=False) -> bool:
    """Whether LoRA runs as the fused kernel (`kernels`) over a plain linear: plain LoRA and
    rsLoRA; DoRA's rescaling, active dropout and expert stacks (grouped rows, per-expert
    factors) take the XLA path."""
    return (not config.dora and not (config.dropout and layer.rng is not None)
            and not experts and use_kernel("lora_linear", layer.config))


def _fused_linear(site, x, inner, entry, p, layer):
    """x W + s (x A) B + bias in the fused kernel, over the site's weight as a matrix."""
    from jft.pallas_kernels.lora_linear import lora_linear

    dims_in, dims_out = site.dims(layer.config)
    size_in, size_out = site.sizes(layer.config)
    lead = x.shape[:x.ndim - len(dims_in)]
    mask = jnp.asarray(p.rank_mask(), x.dtype)[layer.index]
    a = entry["a"].astype(x.dtype).reshape(size_in, -1) * mask
    b = entry["b"].astype(x.dtype).reshape(-1, size_out)
    scale = jnp.asarray(p.scales, jnp.float32)[layer.index]
    weight = site.to_in_out(inner.weight.astype(x.dtype)).reshape(size_in, size_out)
    y = lora_linear(x.reshape(*lead, size_in), weight, a, b, scale).reshape(*lead, *dims_out)
    return y if inner.bias is None else y + inner.bias.astype(x.dtype)


def _dora(site, x, x_in, y, inner, entry, p, a, b, scale, dropout, layer):
    """(ratio [*out], x W [B, T, *out]) of DoRA over the linear y = inner(x) it wraps.

    DoRA replaces the weight W it wraps by ratio (W + s A B), ratio = m / |W + s A B|
    (norms per output feature over the inputs, detached, as PEFT computes them), and keeps
    the bias: y + (ratio - 1) x W + ratio s (x A) B. Over the plain base linear W is the
    base weight; stacked over other adapters it is the weight they apply together
    (`inner.merged()`), so stacking equals merging them first and DoRA after. x W is
    y less the bias (PEFT's dropout takes x W of the dropped-out input instead, over the
    plain linear; stacked, the wrapped output is rescaled as computed).
    """
    if inner.is_plain:
        weight = site.to_in_out(inner.weight.astype(x.dtype)).astype(jnp.float32)
    else:
        weight, _ = inner.merged()
    combined = weight + scale.astype(jnp.float32) * low_rank_product(a, b).astype(jnp.float32)
    norm = jax.lax.stop_gradient(_in_out_column_norm(combined, len(site.in_axes)))
    ratio = (entry["magnitude"].astype(jnp.float32) / norm).astype(x.dtype)
    # Untargeted layers (layers_to_transform) keep W as is, as merge does.
    ratio = jnp.where(jnp.asarray([r > 0 for r in p.ranks])[layer.index], ratio, 1)
    if inner.is_plain and dropout:
        wx = jnp.einsum(site.equation, x_in, inner.weight.astype(x.dtype))
    elif inner.is_plain:  # reusing y spares a weight-sized matmul and its gradient
        wx = y if inner.bias is None else y - inner.bias.astype(x.dtype)
    else:  # y less what the wrapped adapters give for x = 0: their bias
        zero = jnp.zeros((1,) * len(site.lead) + x.shape[len(site.lead):], x.dtype)
        wx = y - inner(zero)
    return ratio, wx


def _column_norm(site: LinearSite, weight: jax.Array) -> jax.Array:
    """DoRA's magnitude of a stacked weight [L, ...]: per output feature [L, *out], the L2
    norm over the inputs."""
    weight = site.to_in_out(weight.astype(jnp.float32), lead=1)
    axes = tuple(range(1, 1 + len(site.in_axes)))
    return jnp.sqrt(jnp.sum(jnp.square(weight), axis=axes))


def _in_out_column_norm(weight: jax.Array, in_axes: int) -> jax.Array:
    """The same for one layer's weight in the in-out layout [*in, *out]."""
    return jnp.sqrt(jnp.sum(jnp.square(weight.astype(jnp.float32)), axis=tuple(range(in_axes))))


def _broadcast(mask: np.ndarray, in_axes: int) -> jax.Array:
    """[L, r] rank mask shaped to broadcast against a [L, *in, r] factor."""
    return jnp.asarray(mask, jnp.float32).reshape(mask.shape[0], *([1] * in_axes), mask.shape[1])


def _fold(base, delta, model, config, sign):
    layers = dict(base["layers"])
    for module, p in plan(model, config).items():
        site = linear_site(model, module)
        in_axes = len(site.in_axes)
        entry = delta["layers"][module]
        group = len(site.group_axes)
        a = entry["a"].astype(jnp.float32) * _broadcast(p.rank_mask(), group + in_axes)
        product = low_rank_product
        for _ in range(1 + group):  # over layers, and experts
            product = jax.vmap(product)
        product = product(a, entry["b"].astype(jnp.float32))
        scales = jnp.asarray(p.scales, jnp.float32).reshape(-1, *([1] * (product.ndim - 1)))
        weight = site.to_in_out(base["layers"][module].astype(jnp.float32), lead=1)
        combined = weight + sign * scales * product  # [L, *in, *out]
        if config.dora:
            norm = jnp.sqrt(jnp.sum(jnp.square(combined), axis=tuple(range(1, 1 + in_axes))))
            ratio = entry["magnitude"].astype(jnp.float32) / norm  # rescales each output
            active = jnp.asarray([r > 0 for r in p.ranks]).reshape(-1, *([1] * (ratio.ndim - 1)))
            ratio = jnp.where(active, ratio, 1.0)
            combined = combined * ratio.reshape(ratio.shape[0], *([1] * in_axes),
                                                *ratio.shape[1:])
        layers[module] = site.from_in_out(combined, lead=1).astype(base["layers"][module].dtype)
    return dict(base, layers=layers)


LORA = register(Lora())
