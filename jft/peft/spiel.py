"""SpIEL (Ansell et al. 2024, arXiv 2401.16405): sparse fine-tuning of a fixed number of
weight entries per matrix, whose positions are periodically regrown (SpIEL-AG).

The delta, per targeted module, stacked over layers (layer-invariant k and c, so shapes
are static):

- `values` [L, k] float32, trainable: the change of k entries of each layer's weight.
- `indices` [L, k] int32, frozen: flat positions of those entries in the layer's weight
  (the weight reshaped to 1-D), distinct within a layer.
- `candidates` [L, c] int32, frozen: positions that might be grown at the next
  reselection.
- `candidate_grads` [L, c] float32, marked trainable but optimised by `optax.identity`
  (`optimizer_overrides`), so that each "update" adds the gradient: its value is the
  gradient summed since the candidates were drawn. The forward adds `g - stop_gradient(g)`
  at the candidate positions: zero in value, dL/dW there as its gradient.

The forward builds each layer's weight W + scatter(values) (+ the zero-valued candidate
term) in float32 and casts it to the model's dtype; stacked over other adapters, it adds
x times the scattered delta to their output instead. Every `reselection_steps`
updates (`refresh`), each targeted layer drops the `round(rate * k)` entries of smallest
|value| and grows the valid candidates of largest accumulated |gradient| (valid: not
already an active position and not a repeat of an earlier candidate) in their place, at
value 0 with a fresh optimiser state; then new candidates are drawn and their gradient
sums zeroed. The rate decays from `initial_reselection_rate` to 0 (linearly or on a
cosine) over `selection_duration` of the run.

How many entries: `count` per targeted matrix; else `num_tunable_weights` over all
targeted matrices; else `density` of the model's parameters (as the reference's
`int(total_params * density)`). A total is split among the targeted matrices in
proportion to their sizes (rounded down, as the reference does).
"""

from __future__ import annotations

import dataclasses
import math
from functools import cache, partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jft.errors import JftError
from jft.models import ModelConfig
from jft.models.sites import linear_site
from jft.peft.base import MethodBase, Targets, as_targets, numpy_rng, register

POLICIES = ("linear", "cosine")
_MAX_INDEX = 2**31 - 1  # indices are int32


@dataclasses.dataclass(frozen=True)
class SpielConfig:
    """SpIEL's options (SftConfig / SftArguments of the reference, rigl selection)."""

    targets: Targets = Targets("all-linear")
    density: float = 0.01
    count: int | None = None
    num_tunable_weights: int | None = None
    reselection_steps: int = 20
    initial_reselection_rate: float = 0.2
    reselection_rate_policy: Literal["linear", "cosine"] = "linear"
    selection_duration: float = 1.0
    candidates_per_replacement_slot: int = 5

    def __post_init__(self):
        object.__setattr__(self, "targets", as_targets(self.targets))
        if not 0.0 < self.density <= 1.0:
            raise JftError(f"spiel density must be in (0, 1], got {self.density}")
        for name in ("count", "num_tunable_weights"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise JftError(f"spiel {name} must be a positive integer or None, got {value!r}")
        if isinstance(self.reselection_steps, bool) or not isinstance(
                self.reselection_steps, int) or self.reselection_steps < 0:
            raise JftError("spiel reselection_steps must be a non-negative integer (0: never "
                           f"regrow), got {self.reselection_steps!r}")
        if not 0.0 <= self.initial_reselection_rate <= 1.0:
            raise JftError("spiel initial_reselection_rate must be in [0, 1], got "
                           f"{self.initial_reselection_rate}")
        if self.reselection_rate_policy not in POLICIES:
            raise JftError(f"spiel reselection_rate_policy {self.reselection_rate_policy!r}; "
                           f"valid: {', '.join(POLICIES)}")
        if not 0.0 < self.selection_duration <= 1.0:
            raise JftError("spiel selection_duration must be in (0, 1] (a fraction of the "
                           f"run), got {self.selection_duration}")
        if isinstance(self.candidates_per_replacement_slot, bool) or not isinstance(
                self.candidates_per_replacement_slot, int) or (
                self.candidates_per_replacement_slot < 1):
            raise JftError("spiel candidates_per_replacement_slot must be a positive integer, "
                           f"got {self.candidates_per_replacement_slot!r}")


@dataclasses.dataclass(frozen=True)
class ModulePlan:
    """One targeted module: where it is targeted, one layer's weight size, k and c."""

    active: tuple[bool, ...]  # [L]
    size: int  # entries of one layer's weight
    k: int  # tuned entries per targeted layer
    candidates: int  # candidate positions per layer

    def mask(self) -> np.ndarray:
        return np.asarray(self.active)


@cache
def plan(model: ModelConfig, config: SpielConfig) -> dict[str, ModulePlan]:
    """Targeted modules with their k and candidate count, checked against the model."""
    chosen = config.targets.resolve(model)
    sizes = {m: math.prod(linear_site(model, m).sizes(model)) for m in chosen}
    for module, size in sizes.items():
        if size > _MAX_INDEX:
            raise JftError(f"spiel cannot index {module}: {size} entries exceed int32")
    if config.count is not None:
        too_big = [m for m in chosen if config.count > sizes[m]]
        if too_big:
            raise JftError(f"spiel count {config.count} exceeds the {sizes[too_big[0]]} "
                           f"entries of {too_big[0]}")
        ks = dict.fromkeys(chosen, config.count)
    else:
        targeted = sum(sizes[m] * int(active.sum()) for m, active in chosen.items())
        if config.num_tunable_weights is not None:
            option, total = "num_tunable_weights", config.num_tunable_weights
        else:
            option, total = "density", int(model.num_params() * config.density)
        if total > targeted:
            raise JftError(f"spiel {option} gives {total} tunable weights, more than the "
                           f"{targeted} entries of the targeted matrices")
        ks = {m: total * sizes[m] // targeted for m in chosen}
        empty = [m for m, k in ks.items() if k == 0]
        if empty:
            raise JftError(f"spiel {option} gives {total} tunable weights, which leaves none "
                           f"for {empty[0]}; raise it or set count")
    plans = {}
    for module, active in chosen.items():
        k, size = ks[module], sizes[module]
        wanted = math.ceil(config.initial_reselection_rate * k)
        c = min(wanted * config.candidates_per_replacement_slot, size - k)
        plans[module] = ModulePlan(tuple(bool(a) for a in active), size, k, c)
    return plans


def reselection_rate(config: SpielConfig, step: int, total_steps: int) -> float:
    """The fraction of each layer's entries swapped at `step`: the initial rate decayed to 0
    over `selection_duration * total_steps` steps, 0 after."""
    horizon = config.selection_duration * total_steps
    if horizon <= 0 or step >= horizon:
        return 0.0
    t = step / horizon
    if config.reselection_rate_policy == "cosine":
        return config.initial_reselection_rate * 0.5 * (1.0 + math.cos(math.pi * t))
    return config.initial_reselection_rate * (1.0 - t)


def swap_count(config: SpielConfig, p: ModulePlan, step: int, total_steps: int) -> int:
    """Entries each targeted layer of the module swaps at `step` (round half up)."""
    return min(int(math.floor(reselection_rate(config, step, total_steps) * p.k + 0.5)), p.k)


class Spiel(MethodBase):
    name = "spiel"
    supports_moe = False
    edits_base_weights = True
    Config = SpielConfig

    def init(self, key, base, model, config, calibration_batches=None):
        rng = numpy_rng(key)
        layers = {}
        for module, p in plan(model, config).items():
            indices = np.empty((model.num_layers, p.k), np.int32)
            candidates = np.empty((model.num_layers, p.candidates), np.int32)
            for layer in range(model.num_layers):
                # Distinct positions, the first k tuned and the rest candidates: no collision.
                drawn = _distinct(rng, p.size, p.k + p.candidates)
                indices[layer], candidates[layer] = drawn[:p.k], drawn[p.k:]
            layers[module] = {
                "values": jnp.zeros((model.num_layers, p.k), jnp.float32),
                "indices": jnp.asarray(indices),
                "candidates": jnp.asarray(candidates),
                "candidate_grads": jnp.zeros((model.num_layers, p.candidates), jnp.float32),
            }
        return {"layers": layers}

    def wraps_linear(self, site, delta, delta_layer, config):
        return site.name in delta_layer

    def linear(self, site, x, inner, delta, delta_layer, layer, config):
        p = plan(layer.config, config)[site.name]
        entry = delta_layer[site.name]
        on = jnp.asarray(p.mask())[layer.index]
        values = jnp.where(on, entry["values"].astype(jnp.float32), 0.0)
        g = entry["candidate_grads"].astype(jnp.float32)
        probe = jnp.where(on, g - jax.lax.stop_gradient(g), 0.0)  # 0, with dL/dW as grad

        def scatter(weight):  # weight + the sparse delta, in float32
            # Through unravelled indices: no reshape of a (maybe sharded) weight.
            at = partial(jnp.unravel_index, shape=weight.shape)
            return weight.at[at(entry["indices"])].add(values).at[at(entry["candidates"])].add(
                probe)

        if inner.is_plain:  # one matmul with the edited weight
            dense = scatter(inner.weight.astype(jnp.float32)).astype(layer.config.dtype)
            y = jnp.einsum(site.equation, x, dense.astype(x.dtype))
            return y if inner.bias is None else y + inner.bias.astype(x.dtype)
        # Over other adapters: their output plus x times the sparse delta, as a dense matrix.
        sparse = scatter(jnp.zeros(inner.weight.shape, jnp.float32))
        return inner(x) + jnp.einsum(site.equation, x, sparse.astype(x.dtype))

    def optimizer_overrides(self, config):
        return {"candidate_grads": optax.identity()}

    def refresh_every(self, config) -> int:
        return config.reselection_steps if config.initial_reselection_rate > 0 else 0

    def refresh(self, delta, step, total_steps, key, model, config):
        swaps = {m: jnp.asarray(swap_count(config, p, step, total_steps), jnp.int32)
                 for m, p in plan(model, config).items()}
        return _regrow(model, config, delta, swaps, key)

    def trainable(self, delta, config):
        return {"layers": {
            module: {name: name in ("values", "candidate_grads") for name in entry}
            for module, entry in delta["layers"].items()
        }}

    def merge(self, base, delta, model, config):
        return _fold(base, delta, model, config, sign=1.0)

    def unmerge(self, base, delta, model, config):
        return _fold(base, delta, model, config, sign=-1.0)

    def num_params(self, delta, model, config):
        return sum(p.k * sum(p.active) for p in plan(model, config).values())

    def identity(self, delta, base, model, config):
        return {"layers": {
            module: dict(entry, values=jnp.zeros_like(entry["values"]),
                         candidate_grads=jnp.zeros_like(entry["candidate_grads"]))
            for module, entry in delta["layers"].items()
        }}

    def delta_axes(self, delta, model, config):
        # Every leaf lists entries of the layer's flattened weight: they spread over the
        # weight's mesh axes (by count, not position: the entries sit anywhere in it).
        return {"layers": {
            module: dict.fromkeys(entry, ("layers", linear_site(model, module).weight_axes[1:]))
            for module, entry in delta["layers"].items()
        }}


# ---------------------------------------------------------------- regrowth


@partial(jax.jit, static_argnums=(0, 1))
def _regrow(model: ModelConfig, config: SpielConfig, delta, swaps, key):
    """(new delta, reset tree) of one reselection; `swaps` module -> traced int."""
    layers, resets = {}, {}
    for i, (module, p) in enumerate(plan(model, config).items()):
        entry = delta["layers"][module]
        no = jnp.zeros((), bool)
        if p.candidates == 0:  # a (nearly) dense matrix: nothing to grow
            layers[module] = entry
            resets[module] = {name: no for name in entry}
            continue
        count = swaps[module] * jnp.asarray(p.mask(), jnp.int32)  # untargeted layers: 0
        values, indices, reset = jax.vmap(_regrow_layer)(
            entry["values"], entry["indices"], entry["candidates"], entry["candidate_grads"],
            count)
        keys = jax.random.split(jax.random.fold_in(key, i), model.num_layers)
        draw = partial(_draw_candidates, size=p.size, count=p.candidates)
        candidates = jax.vmap(draw)(keys, indices)
        layers[module] = {
            "values": values,
            "indices": indices,
            "candidates": candidates.astype(entry["candidates"].dtype),
            "candidate_grads": jnp.zeros_like(entry["candidate_grads"]),
        }
        # The candidates' sums start afresh too (optax.identity keeps no state, but a
        # MultiSteps accumulator would).
        resets[module] = {"values": reset, "indices": no, "candidates": no,
                          "candidate_grads": jnp.ones((), bool)}
    return {"layers": layers}, {"layers": resets}


def _regrow_layer(values, indices, candidates, grads, n):
    """One layer: the `min(n, valid candidates)` smallest-|value| slots take the valid
    candidates of largest |summed gradient|, at value 0. Returns (values, indices, reset)."""
    s = min(values.shape[0], candidates.shape[0])  # the most that can swap
    valid = ~_invalid(candidates, indices)
    score = jnp.where(valid, jnp.abs(grads.astype(jnp.float32)), -1.0)
    best = jnp.argsort(-score, stable=True)[:s]  # valid first, largest |grad| first
    worst = jnp.argsort(jnp.abs(values), stable=True)[:s]  # smallest |value| first
    take = jnp.arange(s) < jnp.minimum(n, valid.sum())
    indices = indices.at[worst].set(jnp.where(take, candidates[best], indices[worst]))
    values = values.at[worst].set(jnp.where(take, 0.0, values[worst]).astype(values.dtype))
    reset = jnp.zeros(values.shape, bool).at[worst].set(take)
    return values, indices, reset


def _invalid(candidates, indices):
    """True for candidates that are active positions or repeat an earlier candidate."""
    ordered_indices = jnp.sort(indices)
    at = jnp.clip(jnp.searchsorted(ordered_indices, candidates), 0, indices.shape[0] - 1)
    taken = ordered_indices[at] == candidates
    order = jnp.argsort(candidates, stable=True)  # repeats after their first occurrence
    ordered = candidates[order]
    repeat = jnp.concatenate([jnp.zeros(1, bool), ordered[1:] == ordered[:-1]])
    return taken | jnp.zeros_like(repeat).at[order].set(repeat)


def _draw_candidates(key, indices, size: int, count: int):
    """`count` random positions, avoiding active ones and repeats where it can: twice as
    many are drawn and the valid ones kept, in draw order. Should fewer than `count` be
    valid, the rest are copies of the first draw: invalid at the next regrowth (a repeat
    of a kept draw, or an active position)."""
    drawn = jax.random.randint(key, (2 * count,), 0, size, dtype=jnp.int32)
    keep = jnp.nonzero(~_invalid(drawn, indices), size=count, fill_value=0)[0]
    return drawn[keep]


# ---------------------------------------------------------------- helpers


def _distinct(rng: np.random.Generator, size: int, count: int) -> np.ndarray:
    """`count` distinct uniform positions in [0, size), in random order.

    The distinct values of iid draws, given how many there are, are a uniform subset of
    that size, so a random `count` of them is a uniform `count`-subset."""
    if 2 * count >= size:
        return rng.permutation(size)[:count]
    extra = int(1.5 * count * count / size) + 16  # about the expected repeats, and more
    while True:
        drawn = np.sort(rng.integers(0, size, count + extra))
        drawn = drawn[np.concatenate([[True], drawn[1:] != drawn[:-1]])]
        if drawn.shape[0] >= count:
            return rng.permutation(drawn)[:count]
        extra *= 2


def _fold(base, delta, model, config, sign: float):
    """The base with the values scattered in (sign 1) or out (sign -1), in float32."""
    layers = dict(base["layers"])
    rows = jnp.arange(model.num_layers)[:, None]
    for module, p in plan(model, config).items():
        entry = delta["layers"][module]
        weight = base["layers"][module]
        values = entry["values"].astype(jnp.float32) * jnp.asarray(p.mask(), jnp.float32)[:, None]
        at = (rows, *jnp.unravel_index(entry["indices"], weight.shape[1:]))
        combined = weight.astype(jnp.float32).at[at].add(sign * values)
        layers[module] = combined.astype(weight.dtype)
    return dict(base, layers=layers)


SPIEL = register(Spiel())
