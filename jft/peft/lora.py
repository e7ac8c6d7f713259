"""LoRA, rsLoRA and DoRA: y = x W + s (x A) B, with s = alpha / r (or alpha / sqrt(r)).

The delta, per targeted module: `a` [L, *in, r] and `b` [L, r, *out] (PEFT's lora_A
and lora_B, transposed into jft's [in, out] layout), and for DoRA a `magnitude`
[L, *out]. Modules whose rank differs by layer (`rank_pattern`, EVA's redistribution)
are padded to their largest rank, the padding masked out.

Inits (`init`): `default` (PEFT's: Kaiming-uniform A, zero B) and `gaussian` (normal A
with std 1/r, zero B) live here; the data-driven ones (PiSSA, EVA, CorDA, LoRA-GA) are
in `lora_inits.py`. An init that rewrites the base (PiSSA, CorDA, LoRA-GA) leaves it
alone: the delta records the initial factors as `init_a` / `init_b` (not trainable), and
`rebase` gives W - s A0 B0, so that merge and export stay exact.
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

from jft.errors import JftError
from jft.models import ModelConfig
from jft.peft.base import (
    LINEAR_MODULES,
    MethodBase,
    Targets,
    as_targets,
    module_axes,
    module_dims,
    module_path,
    register,
    use_kernel,
)

INITS = ("default", "gaussian", "pissa", "eva", "corda", "loraga")


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
        ranks, scales = [], []
        for layer in range(model.num_layers):
            path = module_path(layer, module)
            r = _pattern_value(config.rank_pattern, path, module, config.r) if active[layer] else 0
            alpha = _pattern_value(config.alpha_pattern, path, module, config.alpha)
            limit = min(math.prod(d) for d in module_dims(model, module))
            if r > limit:
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


def _einsum_in(module: str) -> str:
    return "BTNH,NHr->BTr" if module == "o_proj" else "BTD,Dr->BTr"


def _einsum_out(module: str) -> str:
    return {"q_proj": "BTr,rNH->BTNH", "k_proj": "BTr,rNH->BTNH", "v_proj": "BTr,rNH->BTNH"}.get(
        module, "BTr,rD->BTD"
    )


def low_rank_product(a: jax.Array, b: jax.Array) -> jax.Array:
    """A @ B in the base weight's layout: [*in, r] x [r, *out] -> [*in, *out]."""
    return jnp.tensordot(a, b, axes=1)


class Lora(MethodBase):
    name = "lora"
    Config = LoraConfig

    def init(self, key, base, model, config, calibration_batches=None):
        if config.init not in ("default", "gaussian"):
            from jft.peft import lora_inits

            return lora_inits.init(key, base, model, config, calibration_batches)
        layers = {}
        for module, p in plan(model, config).items():
            key, a_key = jax.random.split(key)
            dims_in, dims_out = module_dims(model, module)
            shape_a = (model.num_layers, *dims_in, p.max_rank)
            if config.init == "gaussian":
                a = jax.random.normal(a_key, shape_a) / config.r
            else:  # Kaiming-uniform with a = sqrt(5): bound 1 / sqrt(fan_in)
                bound = 1.0 / math.sqrt(math.prod(dims_in))
                a = jax.random.uniform(a_key, shape_a, minval=-bound, maxval=bound)
            a = a * _broadcast(p.rank_mask(), len(dims_in))
            entry = {"a": a, "b": jnp.zeros((model.num_layers, p.max_rank, *dims_out))}
            if config.dora:
                entry["magnitude"] = _column_norm(base["layers"][module], len(dims_in))
            layers[module] = entry
        return {"layers": layers}

    def linear(self, module, x, weight, equation, delta, delta_layer, layer, config):
        if not _fused(module, delta_layer, layer, config):
            return None
        from jft.pallas_kernels.lora_linear import lora_linear

        p = plan(layer.config, config)[module]
        entry = delta_layer[module]
        dims_in, dims_out = module_dims(layer.config, module)
        size_in, size_out = math.prod(dims_in), math.prod(dims_out)
        lead = x.shape[:x.ndim - len(dims_in)]
        mask = jnp.asarray(p.rank_mask(), x.dtype)[layer.index]
        a = entry["a"].astype(x.dtype).reshape(size_in, -1) * mask
        b = entry["b"].astype(x.dtype).reshape(-1, size_out)
        scale = jnp.asarray(p.scales, jnp.float32)[layer.index]
        y = lora_linear(x.reshape(*lead, size_in), weight.reshape(size_in, size_out), a, b,
                        scale)
        return y.reshape(*lead, *dims_out)

    def linear_output(self, module, x, y, weight, bias, delta_layer, layer, config):
        if module not in delta_layer or _fused(module, delta_layer, layer, config):
            return y
        p = plan(layer.config, config)[module]
        entry = delta_layer[module]
        a, b = entry["a"].astype(x.dtype), entry["b"].astype(x.dtype)
        scale = jnp.asarray(p.scales, x.dtype)[layer.index]
        dropout = bool(config.dropout and layer.rng is not None)
        if dropout:
            key = jax.random.fold_in(layer.rng, LINEAR_MODULES.index(module))
            keep = jax.random.bernoulli(key, 1.0 - config.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - config.dropout), 0).astype(x.dtype)
        xa = jnp.einsum(_einsum_in(module), x, a)
        xa = xa * jnp.asarray(p.rank_mask(), x.dtype)[layer.index]
        lora = jnp.einsum(_einsum_out(module), xa, b) * scale
        if not config.dora:
            return y + lora
        # DoRA, as PEFT computes it: the norm of W + s A B is a constant (detached).
        in_axes = len(module_dims(layer.config, module)[0])
        combined = weight.astype(jnp.float32) + scale * low_rank_product(a, b).astype(jnp.float32)
        norm = jax.lax.stop_gradient(_column_norm(combined, in_axes, stacked=False))
        ratio = (entry["magnitude"].astype(jnp.float32) / norm).astype(x.dtype)
        # Untargeted layers (layers_to_transform) keep W as is, as merge does.
        ratio = jnp.where(jnp.asarray([r > 0 for r in p.ranks])[layer.index], ratio, 1)
        if dropout or len(layer.pairs) > 1:
            # PEFT rescales x W of the dropped-out x; another adapter may have edited y.
            base = jnp.einsum(_einsum_base(module), x, weight)
        else:  # y is x W (+ bias): reusing it spares a weight-sized matmul and its gradient
            base = y if bias is None else y - bias
        return y + (ratio - 1) * base + ratio * lora

    def init_with_config(self, key, base, model, config, calibration_batches=None):
        if config.init == "eva":  # EVA's rank redistribution settles per-layer ranks
            from jft.peft import lora_inits

            return lora_inits.init_eva(key, base, model, config, calibration_batches)
        return config, self.init(key, base, model, config, calibration_batches)

    def rebase(self, base, delta, model, config):
        """The base an init rewrote (PiSSA, CorDA, LoRA-GA): W - s A0 B0, from the initial
        factors the delta records as `init_a` / `init_b`. Other inits leave it alone."""
        recorded = {m: e for m, e in delta["layers"].items() if "init_a" in e}
        if not recorded:
            return base
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
            dims_in, dims_out = module_dims(model, module)
            size_in, size_out = math.prod(dims_in), math.prod(dims_out)
            total += sum(r * (size_in + size_out) for r in p.ranks)
            if config.dora:
                total += size_out * sum(r > 0 for r in p.ranks)
        return total

    def identity(self, delta, base, model, config):
        layers = {}
        for module, entry in delta["layers"].items():
            entry = dict(entry, b=jnp.zeros_like(entry["b"]))  # init_a / init_b are kept
            if "magnitude" in entry:
                in_axes = len(module_dims(model, module)[0])
                entry["magnitude"] = _column_norm(base["layers"][module], in_axes)
            layers[module] = entry
        return {"layers": layers}

    def delta_axes(self, delta, model, config):
        # A shards like W's inputs, B like its outputs, DoRA's magnitude like its output
        # columns; the rank is small and stays replicated.
        layers = {}
        for module, entry in delta["layers"].items():
            axes_in, axes_out = module_axes(module)
            a, b = ("layers", *axes_in, None), ("layers", None, *axes_out)
            by_name = {"a": a, "init_a": a, "b": b, "init_b": b,
                       "magnitude": ("layers", *axes_out)}
            layers[module] = {name: by_name[name] for name in entry}
        return {"layers": layers}


def _fused(module, delta_layer, layer, config) -> bool:
    """Whether this module's LoRA runs as the fused kernel (`kernels`), which covers
    plain LoRA and rsLoRA: DoRA's rescaling and active dropout take the XLA path."""
    return (module in delta_layer and not config.dora
            and not (config.dropout and layer.rng is not None)
            and use_kernel("lora_linear", layer.config))


def _einsum_base(module: str) -> str:
    return {"q_proj": "BTD,DNH->BTNH", "k_proj": "BTD,DNH->BTNH", "v_proj": "BTD,DNH->BTNH",
            "o_proj": "BTNH,NHD->BTD", "down_proj": "BTF,FD->BTD"}.get(module, "BTD,DF->BTF")


def _column_norm(weight: jax.Array, in_axes: int, stacked: bool = True) -> jax.Array:
    """L2 norm over the input axes of a [L, *in, *out] (or unstacked [*in, *out]) weight:
    one value per output feature, as DoRA's magnitude."""
    lead = 1 if stacked else 0
    axes = tuple(range(lead, lead + in_axes))
    return jnp.sqrt(jnp.sum(jnp.square(weight.astype(jnp.float32)), axis=axes))


def _broadcast(mask: np.ndarray, in_axes: int) -> jax.Array:
    """[L, r] rank mask shaped to broadcast against a [L, *in, r] factor."""
    return jnp.asarray(mask, jnp.float32).reshape(mask.shape[0], *([1] * in_axes), mask.shape[1])


def _fold(base, delta, model, config, sign):
    layers = dict(base["layers"])
    for module, p in plan(model, config).items():
        entry = delta["layers"][module]
        in_axes = len(module_dims(model, module)[0])
        a = entry["a"].astype(jnp.float32) * _broadcast(p.rank_mask(), in_axes)
        product = jax.vmap(low_rank_product)(a, entry["b"].astype(jnp.float32))
        scales = jnp.asarray(p.scales, jnp.float32).reshape(-1, *([1] * (product.ndim - 1)))
        weight = base["layers"][module].astype(jnp.float32)
        combined = weight + sign * scales * product
        if config.dora:
            norm = _column_norm(combined, in_axes)  # DoRA rescales each output column
            ratio = entry["magnitude"].astype(jnp.float32) / norm
            active = jnp.asarray([r > 0 for r in p.ranks]).reshape(-1, *([1] * (ratio.ndim - 1)))
            ratio = jnp.where(active, ratio, 1.0)
            combined = combined * ratio.reshape(ratio.shape[0], *([1] * in_axes),
                                                *ratio.shape[1:])
        layers[module] = combined.astype(base["layers"][module].dtype)
    return dict(base, layers=layers)


LORA = register(Lora())
