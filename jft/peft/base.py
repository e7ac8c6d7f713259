"""The protocol every PEFT method implements, the adapter pytree, and PEFT-style targeting.

A method's trainable state (its *delta*) is a pytree of its own, beside the frozen base.
Per-layer leaves sit under `delta["layers"]`, stacked on the same leading axis as the
base's layers, so the layer scan hands each layer its `(base_layer, delta_layer)` slices
and never copies the base.

An `Adapter` couples a method and its (hashable) config, which are static, with a delta,
which is traced: `jax.grad` over a tuple of adapters differentiates the deltas only.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from jft.errors import ConfigValueError, JftError
from jft.models import ModelConfig
from jft.models.sites import LinearSite, linear_sites
from jft.pallas_kernels import use_kernel  # noqa: F401  (methods import it from here)

Delta = dict[str, Any]


@runtime_checkable
class Method(Protocol):
    """One PEFT method; `MethodBase` gives every hook a no-op default.

    Hooks that run inside the layer scan get `layer`: the model's `LayerHooks`, whose
    `.config` is the ModelConfig, `.index` the (traced) layer index and `.rng` the
    dropout key (None when not training).

    Linears: the model declares its call sites (`jft.models.sites.LinearSite`: name,
    einsum, weight and bias keys, logical axes, HF path), and a method derives shapes,
    einsums and axes from the site it is handed. At each site the base linear is wrapped
    by every adapter whose `wraps_linear` is true, in list order: `adapters[0]` wraps
    the base linear, `adapters[1]` wraps that, and so on. Each `linear` hook calls the
    linear it wraps explicitly, so stacking equals merging the adapters into the base
    one after another in list order (where their merges are exact).
    """

    name: ClassVar[str]
    Config: ClassVar[type]

    def init(self, key: jax.Array, base: dict, model: ModelConfig, config: Any,
             calibration_batches: Sequence[Any] | None = None) -> Delta:
        """A fresh delta; `calibration_batches` for data-driven inits."""

    def edit_params(self, params: dict, delta: Delta, model: ModelConfig, config: Any) -> dict:
        """Cheap whole-tree edits before the forward pass (biases, norms, full weights)."""

    def wraps_linear(self, site: LinearSite, delta: Delta, delta_layer: Delta,
                     config: Any) -> bool:
        """Whether this adapter's `linear` wraps the linear at `site` (static)."""

    def linear(self, site: LinearSite, x: jax.Array, inner: Any, delta: Delta,
               delta_layer: Delta, layer, config: Any) -> jax.Array:
        """The output [B, T, *out] at `site` for x [B, T, *in], computed by calling
        `inner`, the linear this adapter wraps (`jft.models.transformer.Linear`:
        `inner(x)`; `inner.is_plain` when it is the bare base linear, whose `weight` and
        `bias` a fused kernel may then use directly; `inner.merged()` otherwise gives its
        effective weight and bias). `delta` is the whole delta, `delta_layer` this
        layer's slice."""

    def wraps_feed_forward(self, delta: Delta, delta_layer: Delta, config: Any) -> bool:
        """Whether this adapter's `feed_forward` wraps the layer's feed-forward (static)."""

    def feed_forward(self, h: jax.Array, inner: Any, delta: Delta, delta_layer: Delta, layer,
                     params: dict, valid: jax.Array, config: Any) -> tuple[jax.Array, dict]:
        """The layer's feed-forward on the normed h [B, T, D], computed around `inner(h)`
        -> (y, aux), the one it wraps: (y [B, T, D], aux), aux a dict of arrays summed over
        layers and handed to the objective (`forward`'s return_aux; MixLoRA reports its
        router's balance loss there). `params` are the layer's (its MLP weights, through
        `layer.linear`); `valid` [B, T] marks real tokens."""

    def prompt_embeddings(self, delta: Delta, config: Any) -> jax.Array | None:
        """Virtual-token embeddings [P, D] prepended to the input, or None."""

    def layer_delta(self, delta: Delta, model: ModelConfig, config: Any) -> Delta:
        """The per-layer (stacked) part of the delta the scan slices; by default
        `delta["layers"]`. Prefix tuning runs its reparameterisation MLP here, once."""

    def attention_prefix(self, delta_layer: Delta, layer, config: Any):
        """This layer's key/value prefixes ([P, K, H], [P, K, H]), or None."""

    def edit_layer(self, layer_params: dict, delta: Delta, delta_layer: Delta, layer,
                   config: Any) -> dict:
        """One layer's params inside the scan, before anything runs (LISA swaps its active
        layers in here). `delta` is the whole delta, `delta_layer` this layer's slice."""

    def optimizer_overrides(self, config: Any) -> dict[str, Any]:
        """optax transforms that replace the run's optimiser on the trainable delta leaves of
        these names (SpIEL sums its candidates' gradients with `optax.identity`)."""

    def refresh_every(self, config: Any) -> int:
        """Optimiser steps between `refresh` calls; 0: never."""

    def needs_calibration(self, config: Any) -> bool:
        """Whether `init` needs calibration batches (a few training batches: EVA, CorDA,
        LoRA-GA, S2FT's activation and gradient selections)."""

    def refresh(self, delta: Delta, step: int, total_steps: int, key: jax.Array,
                model: ModelConfig, config: Any) -> tuple[Delta, Any]:
        """Between two updates, every `refresh_every` steps: reselects what is trained
        (SpIEL regrows, LISA switches layers, HFT starts a round). Returns the new delta,
        with every leaf's shape and dtype unchanged (so nothing recompiles), and a tree
        shaped like `delta` of bool arrays (broadcastable to the leaf): True where the
        optimiser state must start afresh."""

    def split(self, delta: Delta, model: ModelConfig, config: Any) -> tuple[Delta, Any]:
        """(delta, config) of an adapter that applies to the unmodified base (S2FT's
        indexed form of its permuted training layout); unchanged by default."""

    def merge(self, base: dict, delta: Delta, model: ModelConfig, config: Any) -> dict:
        """The base with the delta folded in (computed in fp32, cast back)."""

    def unmerge(self, base: dict, delta: Delta, model: ModelConfig, config: Any) -> dict:
        """Inverse of merge where that is exact; raises JftError otherwise."""

    def rebase(self, base: dict, delta: Delta, model: ModelConfig, config: Any) -> dict:
        """The base a fresh delta applies to: unchanged, except for inits that rewrite it."""

    def trainable(self, delta: Delta, config: Any) -> Any:
        """A tree of bools shaped like `delta`: the leaves the optimiser updates."""

    def num_params(self, delta: Delta, model: ModelConfig, config: Any) -> int:
        """Trainable parameters, counted as PEFT's get_nb_trainable_parameters does."""

    def identity(self, delta: Delta, base: dict, model: ModelConfig, config: Any) -> Delta:
        """A delta of the same structure that leaves the model unchanged."""

    def delta_axes(self, delta: Delta, model: ModelConfig, config: Any) -> Any:
        """The logical axes of every delta leaf, so a mesh shards it like its base: a tree
        shaped like `delta` of tuples with one entry per dimension, each a logical axis
        name (`PARAM_AXES`), None (replicated: LoRA's rank) or a tuple of names for a
        dimension that flattens several (SpIEL's entry index into a [D, N, H] matrix)."""


class MethodBase:
    """No-op hooks; a method overrides the ones it needs."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    # Trains the base's own weights (full FT, LISA, HFT, SpIEL): refused on a quantized base.
    edits_base_weights: ClassVar[bool] = False
    # `rebase` keeps the model's function (S²FT's co-permutation): the base it returns is,
    # without the adapter, still the model that was loaded (a preference reference).
    rebase_keeps_function: ClassVar[bool] = False
    # Runs on MoE models (S²FT and SpIEL select MLP channels of a dense MLP: they do not).
    supports_moe: ClassVar[bool] = True
    # Its factors can carry an expert axis, so its targets may include expert stacks.
    targets_experts: ClassVar[bool] = False

    def reads_base_weights(self, config) -> bool:
        """Whether `init` reads the base's weight values (not just their shapes): a
        quantized base is then dequantized for it."""
        return False

    def edit_params(self, params, delta, model, config):
        return params

    def wraps_linear(self, site, delta, delta_layer, config) -> bool:
        return False

    def linear(self, site, x, inner, delta, delta_layer, layer, config):
        return inner(x)

    def wraps_feed_forward(self, delta, delta_layer, config) -> bool:
        return False

    def feed_forward(self, h, inner, delta, delta_layer, layer, params, valid, config):
        return inner(h)

    def prompt_embeddings(self, delta, config):
        return None

    def layer_delta(self, delta, model, config):
        """What the layer scan hands each layer, computed once before it."""
        return delta.get("layers", {})

    def attention_prefix(self, delta_layer, layer, config):
        return None

    def edit_layer(self, layer_params, delta, delta_layer, layer, config):
        return layer_params

    def optimizer_overrides(self, config):
        return {}

    def refresh_every(self, config) -> int:
        return 0

    def needs_calibration(self, config) -> bool:
        """Whether `init` reads calibration batches (data-driven inits and selections)."""
        return False

    def refresh(self, delta, step, total_steps, key, model, config):
        raise NotImplementedError(f"{self.name} does not refresh")

    def split(self, delta, model, config):
        return delta, config

    def prefix_length(self, config) -> int:
        """Tokens of attention prefix; the real tokens' positions start after them."""
        return 0

    def rebase(self, base, delta, model, config):
        """The base this delta applies to, for inits that rewrite it (PiSSA and kin)."""
        return base

    def init_with_config(self, key, base, model, config, calibration_batches=None):
        """(config, delta): for inits that also settle the config (EVA's ranks)."""
        return config, self.init(key, base, model, config, calibration_batches)

    def unmerge(self, base, delta, model, config):
        raise JftError(f"{self.name} cannot be unmerged exactly; keep the unmerged base")

    def trainable(self, delta, config):
        return jax.tree.map(lambda _: True, delta)

    def num_params(self, delta, model, config) -> int:
        mask = self.trainable(delta, config)
        return sum(int(np.prod(x.shape)) for x, m in
                   zip(jax.tree.leaves(delta), jax.tree.leaves(mask), strict=True) if m)

    def identity(self, delta, base, model, config):
        raise JftError(f"{self.name} has no identity delta, so it cannot mix with base rows")

    def delta_axes(self, delta, model, config):
        """Every leaf replicated; methods whose deltas grow with the model override this."""
        return jax.tree.map(lambda x: (None,) * x.ndim, delta)


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise JftError(f"unknown PEFT method {name!r}; valid: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapter:
    """A method, its config (static) and its delta (traced). A `frozen` adapter rides
    along in a stack untrained (earlier tasks' LoRAs in O-LoRA, ConPET's experts)."""

    delta: Delta
    method: str = dataclasses.field(metadata=dict(static=True))
    config: Any = dataclasses.field(metadata=dict(static=True))
    frozen: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def impl(self) -> Method:
        return get_method(self.method)

    def with_delta(self, delta: Delta) -> Adapter:
        """The same adapter (method, config, frozen) over another delta tree."""
        return dataclasses.replace(self, delta=delta)

    def trainable(self) -> Any:
        """A tree of bools shaped like the delta: the leaves the optimiser updates."""
        if self.frozen:
            return jax.tree.map(lambda _: False, self.delta)
        return self.impl.trainable(self.delta, self.config)


# The training step differentiates, and the optimiser sees, only the trainable leaves;
# the rest of a delta (indices, permutations, LISA's parked layers, PiSSA's initial
# factors) rides along untouched. The two parts have None where the other has a leaf.


def partition(adapters: Sequence[Adapter]) -> tuple[list[Adapter], list[Adapter]]:
    """(trainable part, frozen part) of each adapter's delta."""
    trainable, frozen = [], []
    for adapter in adapters:
        mask = adapter.trainable()
        trainable.append(adapter.with_delta(
            jax.tree.map(lambda x, m: x if m else None, adapter.delta, mask)))
        frozen.append(adapter.with_delta(
            jax.tree.map(lambda x, m: None if m else x, adapter.delta, mask)))
    return trainable, frozen


def combine(trainable: Sequence[Adapter], frozen: Sequence[Adapter]) -> list[Adapter]:
    """The adapters `partition` split."""
    return jax.tree.map(lambda t, f: f if t is None else t, list(trainable), list(frozen),
                        is_leaf=lambda x: x is None)


# ---------------------------------------------------------------- targeting


@dataclasses.dataclass(frozen=True)
class Targets:
    """Which linears a method wraps, the PEFT way.

    modules: site names (`q_proj`, `experts_gate_up`, ...), `"all-linear"`, or one regex
    string matched (`re.fullmatch`) against HF module paths such as
    `model.layers.3.self_attn.q_proj`. "all-linear" and regexes reach the linears PEFT
    sees as modules, not parameter sites (MoE routers and expert stacks).
    layers: `layers_to_transform`, None for all.
    parameters: PEFT's `target_parameters`: parameter paths, each matching a parameter
    site whose path is it or ends with "." + it (`mlp.experts.gate_up_proj`).
    """

    modules: str | tuple[str, ...] = ("q_proj", "v_proj")
    layers: tuple[int, ...] | None = None
    parameters: tuple[str, ...] = ()

    def resolve(self, model: ModelConfig) -> dict[str, np.ndarray]:
        """site name -> bool [L]: the layers where that linear is targeted. Raises if none."""
        layers = range(model.num_layers)
        if self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < model.num_layers]
            if bad:
                raise ConfigValueError("method.layers_to_transform",
                                       f"layers_to_transform has {bad}; the model has layers "
                                       f"0..{model.num_layers - 1}")
            layers = self.layers
        sites = linear_sites(model)
        names = [site.name for site in sites]
        if isinstance(self.modules, tuple):
            unknown = [m for m in self.modules if m not in names]
            if unknown:
                raise ConfigValueError("method.targets",
                                       f"unknown target module {unknown[0]!r}; valid: "
                                       f"{', '.join(names)}, 'all-linear' or a regex")
        for wanted in self.parameters:
            if not any(_names_parameter(site.path(i), wanted) for site in sites
                       if site.parameter for i in range(model.num_layers)):
                paths = [site.hf_path for site in sites if site.parameter]
                raise ConfigValueError("method.target_parameters",
                                       f"target parameter {wanted!r} matches no parameter of "
                                       f"this model; valid: {', '.join(paths) or 'none'}")
        chosen: dict[str, np.ndarray] = {}
        for site in sites:
            active = np.zeros(model.num_layers, bool)
            for i in layers:
                active[i] = self._matches(site, i)
            # As in PEFT, layers_to_transform filters modules, not target_parameters.
            for i in range(model.num_layers):
                active[i] |= self._matches_parameter(site, i)
            if active.any():
                chosen[site.name] = active
        if not chosen:
            raise ConfigValueError(
                "method.targets",
                f"targets {self.modules!r} match no module; valid: {', '.join(names)}, "
                "'all-linear', or a regex over paths like 'model.layers.0.self_attn.q_proj'"
            )
        return chosen

    def _matches_parameter(self, site: LinearSite, layer: int) -> bool:
        return site.parameter and any(_names_parameter(site.path(layer), p)
                                      for p in self.parameters)

    def _matches(self, site: LinearSite, layer: int) -> bool:
        path = site.path(layer)
        if self.modules == "all-linear":
            return not site.parameter
        if isinstance(self.modules, str):
            return not site.parameter and re.fullmatch(self.modules, path) is not None
        return site.name in self.modules


def _names_parameter(path: str, wanted: str) -> bool:
    """PEFT's target_parameters match: the whole path, or a suffix after a dot."""
    return path == wanted or path.endswith("." + wanted)


def as_targets(value) -> Targets:
    """A Targets from what configs and YAML give: module names, "all-linear" or a regex."""
    if isinstance(value, Targets):
        return value
    return Targets(value if isinstance(value, str) else tuple(value))


def numpy_rng(key: jax.Array) -> np.random.Generator:
    """A numpy generator seeded from a JAX key, for selections made on the host (which
    layers, units or positions train): concrete lists, drawn without a device program."""
    return np.random.default_rng(np.asarray(jax.random.bits(key, (4,), jnp.uint32)))


def layer_mask(active: np.ndarray, shape: tuple[int, ...]) -> jnp.ndarray:
    """[L, 1, ...] float mask that zeroes a stacked delta on untargeted layers."""
    return jnp.asarray(active, jnp.float32).reshape((-1,) + (1,) * (len(shape) - 1))
