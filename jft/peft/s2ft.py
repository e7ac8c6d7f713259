"""S2FT, structured sparse fine-tuning: select sparsely, compute densely.

Each layer trains a few *units*:
- an attention unit is a KV head together with its G = N / K query heads (under plain
  multi-head attention, one head): the unit's output columns of q/k/v_proj and its input
  rows of o_proj;
- an FFN unit is an intermediate channel: a column of gate_proj and up_proj, the matching
  row of down_proj.

`attention_modules` / `mlp_modules` say which of those matrices train their units' slices
(the paper's released recipes train down_proj only, or o_proj and down_proj).

Co-permutation: attention is equivariant under permuting KV heads (with their query
groups) and the FFN under permuting channels, so `rebase` reorders the base's coupled
weights (q, k, v, o and their biases by KV group; gate, up, down and their biases by
channel) until each layer's selected units come first. The model computes exactly the
same function, and the trainable part is a dense block per module: the first C units'
slice, C being the most units any layer selected (layers with fewer mask the rest).

Partial backprop: the frozen base is never differentiated. A block enters as a branch
beside the frozen matmul, y = x W + x[..., :C] B for input-side modules (o, down) and
y[..., :C] += x B for output-side ones (q, k, v, gate, up), so the backward pass keeps
only the C input columns (input side) for the block's gradient and computes dx through
the frozen weight; it never forms a weight gradient of the full matrix. Which axis of a
linear holds units, and on which side, comes from its site's logical axes (`kv_heads`
or `heads`: attention units; `mlp`: channels), and so does what the co-permutation
moves. Stacked over other adapters, the block's term is added to their output.

Selection (`selection`): `random` (the paper's), `weight` (norm of the unit's slices of
the trained matrices), `activation` (mean |input| of o_proj / down_proj over calibration
batches: the unit's own output) or `gradient` (norm of the unit's slices of the mean
loss gradient over calibration batches), picking the largest scores (or the smallest,
`largest: false`). Counts come from `*_ratio` or `*_count`, per layer (`scope: layer`)
or over the pool of all layers' units (`scope: global`, the paper's).

Layouts: `permuted` (training) applies to the co-permuted base; `split()` turns it into
the `indexed` layout, which stores each layer's unit ids and applies to (and merges into
or out of) the original, unpermuted base, so several S2FT adapters can serve side by
side over one base.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jft.errors import JftError
from jft.models import ModelConfig
from jft.models.sites import TRANSFORMER_SITES, LinearSite, linear_site, linear_sites
from jft.models.transformer import logical_axes
from jft.peft.base import MethodBase, numpy_rng, register, use_kernel
from jft.quant.params import dequantize_weight, quantize_like, weight_to_matrix
from jft.quant.tensor import is_quantized

SELECTIONS = ("random", "weight", "activation", "gradient")
DATA_DRIVEN_SELECTIONS = ("activation", "gradient")
# What a unit is, by logical axis: a KV head (its query heads move with it) or an FFN
# channel. A linear trains its units' slice along whichever of these axes it has.
UNIT_GROUPS = {"kv_heads": "attention", "heads": "attention", "mlp": "mlp"}
# The axis permuted by each unit order: KV heads, query heads (each KV head's group
# moves with it), channels.
_ORDER_OF_AXIS = {"kv_heads": "kv", "heads": "q", "mlp": "mlp"}


def unit_axis(site: LinearSite) -> str | None:
    """The logical axis along which `site`'s units lie (None: it has no units)."""
    return next((a for a in (*site.in_axes, *site.out_axes) if a in UNIT_GROUPS), None)


def group_of(site: LinearSite) -> str | None:
    """"attention" or "mlp": whose units `site` trains (None: neither)."""
    axis = unit_axis(site)
    return None if axis is None else UNIT_GROUPS[axis]


def input_side(site: LinearSite) -> bool:
    """Whether the units are the site's inputs (o_proj, down_proj)."""
    return unit_axis(site) in site.in_axes


# The transformer's linears by group, for checking options before there is a model.
ATTENTION = tuple(s.name for s in TRANSFORMER_SITES if group_of(s) == "attention")
MLP = tuple(s.name for s in TRANSFORMER_SITES if group_of(s) == "mlp")


@dataclasses.dataclass(frozen=True)
class S2FTConfig:
    attention_modules: tuple[str, ...] = ("v_proj", "o_proj")
    attention_ratio: float = 0.0
    attention_count: int | None = None
    mlp_modules: tuple[str, ...] = ("down_proj",)
    mlp_ratio: float = 0.03
    mlp_count: int | None = None
    scope: Literal["global", "layer"] = "global"
    selection: Literal["random", "weight", "activation", "gradient"] = "random"
    largest: bool = True
    layout: Literal["permuted", "indexed"] = "permuted"

    def __post_init__(self):
        for name, allowed in (("attention_modules", ATTENTION), ("mlp_modules", MLP)):
            value = getattr(self, name)
            value = (value,) if isinstance(value, str) else tuple(value)
            object.__setattr__(self, name, value)
            # The transformer's linears of the other group are refused here; names it does
            # not declare are checked against the model's own sites (`check_modules`).
            bad = [m for m in value if m in ATTENTION + MLP and m not in allowed]
            if bad:
                raise JftError(f"s2ft {name} has {bad[0]!r}; valid: {', '.join(allowed)}")
        for name in ("attention_ratio", "mlp_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise JftError(f"s2ft {name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("attention_count", "mlp_count"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise JftError(f"s2ft {name} must be >= 0, got {getattr(self, name)}")
        checks = (("scope", ("global", "layer")), ("selection", SELECTIONS),
                  ("layout", ("permuted", "indexed")))
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise JftError(f"s2ft {name} {getattr(self, name)!r}; valid: "
                               f"{', '.join(allowed)}")
        if not self.groups():
            raise JftError("s2ft selects nothing: set attention_ratio / attention_count (with "
                           "attention_modules) or mlp_ratio / mlp_count (with mlp_modules)")

    def groups(self) -> dict[str, tuple[str, ...]]:
        """Unit group ("attention", "mlp") -> the modules that train its units."""
        out = {}
        if self.attention_modules and (self.attention_count or
                                       (self.attention_count is None and self.attention_ratio)):
            out["attention"] = self.attention_modules
        if self.mlp_modules and (self.mlp_count or (self.mlp_count is None and self.mlp_ratio)):
            out["mlp"] = self.mlp_modules
        return out


def check_modules(model: ModelConfig, config: S2FTConfig) -> None:
    """Every trained module is a linear of this model with units of its group."""
    for name, group in (("attention_modules", "attention"), ("mlp_modules", "mlp")):
        allowed = [s.name for s in linear_sites(model) if group_of(s) == group]
        bad = [m for m in getattr(config, name) if m not in allowed]
        if bad:
            raise JftError(f"s2ft {name} has {bad[0]!r}; valid: {', '.join(allowed)}")


def _units(model: ModelConfig, group: str) -> int:
    return model.num_kv_heads if group == "attention" else model.mlp_dim


def _per_unit(model: ModelConfig, site: LinearSite) -> int:
    """Slots of the unit axis per unit: a KV head's G query heads on a heads axis."""
    return model.num_heads // model.num_kv_heads if unit_axis(site) == "heads" else 1


def _slots(model: ModelConfig, site: LinearSite, capacity: int) -> int:
    """Block size along the unit axis."""
    return capacity * _per_unit(model, site)


def _unit_axis(site: LinearSite) -> int:
    """The unit axis of a [L, ...] block or weight."""
    return site.weight_axes.index(unit_axis(site))


# ---------------------------------------------------------------- selection


def select_units(key, base, model: ModelConfig, config: S2FTConfig,
                 calibration_batches=None) -> dict[str, list[np.ndarray]]:
    """group -> per layer, the sorted ids of the selected units."""
    scores = _scores(key, base, model, config, calibration_batches)
    chosen = {}
    for group, score in scores.items():  # score [L, units]
        layers, units = score.shape
        ratio, count = ((config.attention_ratio, config.attention_count) if group == "attention"
                        else (config.mlp_ratio, config.mlp_count))
        pool = units if config.scope == "layer" else layers * units
        total = count if count is not None else max(1, round(ratio * pool))
        if total > pool:
            raise JftError(f"s2ft selects {total} {group} units from a pool of {pool}")
        signed = score if config.largest else -score
        if config.scope == "layer":
            picked = [np.sort(np.argsort(-row, kind="stable")[:total]) for row in signed]
        else:
            flat = np.argsort(-signed.reshape(-1), kind="stable")[:total]
            mask = np.zeros(layers * units, bool)
            mask[flat] = True
            picked = [np.flatnonzero(row) for row in mask.reshape(layers, units)]
        chosen[group] = picked
    return chosen


def _scores(key, base, model, config, batches) -> dict[str, np.ndarray]:
    groups = config.groups()
    if config.selection == "random":
        rng = numpy_rng(key)
        return {g: rng.random((model.num_layers, _units(model, g))) for g in groups}
    if config.selection == "weight":
        return {g: _unit_norms({m: base["layers"][m] for m in modules}, model)
                for g, modules in groups.items()}
    from jft.peft import lora_inits

    prepared = lora_inits.prepare_calibration(batches, f"s2ft selection {config.selection!r}")
    if config.selection == "gradient":
        modules = [m for ms in groups.values() for m in ms]
        grads = lora_inits.mean_weight_gradients(base, model, modules, prepared)
        return {g: _unit_norms({m: grads[m] for m in ms}, model) for g, ms in groups.items()}
    # activation: the units' own outputs, i.e. |input| of the group's first input-side
    # linear (o_proj per query head, summed per KV group; down_proj per channel)
    inputs = {g: next(s for s in linear_sites(model) if group_of(s) == g and input_side(s))
              for g in groups}
    wanted = tuple(inputs[g].name for g in groups)
    per_layer = [None] * model.num_layers
    for layer, stats in lora_inits.input_magnitudes(base, model, prepared, wanted):
        per_layer[layer] = stats
    out = {}
    for group in groups:
        site = inputs[group]
        rows = np.stack([np.asarray(stats[site.name]) for stats in per_layer])
        rows = rows.reshape(model.num_layers, *site.dims(model)[0])
        rows = np.moveaxis(rows, 1 + site.in_axes.index(unit_axis(site)), 1)
        out[group] = rows.reshape(model.num_layers, _units(model, group), -1).sum(-1)
    return out


def _unit_norms(weights: dict[str, jax.Array], model: ModelConfig) -> np.ndarray:
    """[L, units]: the norm of each unit's slices across `weights` (one group's modules)."""
    total = 0.0
    for module, w in weights.items():
        site = linear_site(model, module)
        w = np.asarray(w, np.float32)
        axis = _unit_axis(site)
        if _per_unit(model, site) > 1:  # query heads -> [.., K, G, ..]
            shape = list(w.shape)
            shape[axis:axis + 1] = [model.num_kv_heads, model.num_heads // model.num_kv_heads]
            w = w.reshape(shape)
            w = np.moveaxis(w, axis, 1).reshape(w.shape[0], model.num_kv_heads, -1)
        else:
            w = np.moveaxis(w, axis, 1).reshape(w.shape[0], w.shape[axis], -1)
        total = total + np.sum(w * w, axis=-1)
    return np.sqrt(total)


# ---------------------------------------------------------------- permutation


def _permutations(chosen, model):
    """group -> (perm [L, units]: selected units first, then the rest, each ascending;
    count [L])."""
    out = {}
    for group, picked in chosen.items():
        units = _units(model, group)
        perms, counts = [], []
        for sel in picked:
            rest = np.setdiff1d(np.arange(units), sel)
            perms.append(np.concatenate([sel, rest]))
            counts.append(len(sel))
        out[group] = (np.stack(perms).astype(np.int32), np.asarray(counts, np.int32))
    return out


def _head_order(perm: jax.Array, groups: int) -> jax.Array:
    """[L, K] KV-head order -> [L, N] query-head order (each KV head's group moves with it)."""
    return (perm[:, :, None] * groups + jnp.arange(groups)).reshape(perm.shape[0], -1)


def permute(base: dict, perms: dict[str, jax.Array], model: ModelConfig,
            inverse: bool = False) -> dict:
    """The base with its coupled weights reordered by `perms` (group -> [L, units]), or
    put back in the original order (`inverse`). Pure data movement: exact."""
    if inverse:
        perms = {g: jnp.argsort(p, axis=1) for g, p in perms.items()}
    orders = {}
    if "attention" in perms:
        groups = model.num_heads // model.num_kv_heads
        orders["kv"] = perms["attention"]
        orders["q"] = _head_order(perms["attention"], groups)
    if "mlp" in perms:
        orders["mlp"] = perms["mlp"]
    axes_of = logical_axes(model)
    layers = dict(base["layers"])
    for name in base["layers"]:
        quantized = is_quantized(layers[name])
        if quantized:  # moved as floats, then quantized again with the same settings
            site = linear_site(model, name)
            settings = layers[name]
            layers[name] = dequantize_weight(site, settings, site.dims(model)[0], jnp.float32, 1)
        for axis, logical in enumerate(axes_of.get(name, ())):
            if _ORDER_OF_AXIS.get(logical) in orders:
                layers[name] = _take(layers[name], orders[_ORDER_OF_AXIS[logical]], axis)
        if quantized:
            layers[name] = quantize_like(settings, weight_to_matrix(
                site, np.asarray(layers[name]), lead=1))
    return dict(base, layers=layers)




@jax.jit
def _take_impl(w, order):
    return jax.vmap(lambda wl, ol: jnp.take(wl, ol, axis=0))(w, order)


def _take(w, order, axis):
    moved = jnp.moveaxis(w, axis, 1)
    return jnp.moveaxis(_take_impl(moved, jnp.asarray(order)), 1, axis)


# ---------------------------------------------------------------- the method


class S2FT(MethodBase):
    name = "s2ft"
    supports_moe = False
    Config = S2FTConfig
    rebase_keeps_function = True  # co-permuted rows and columns compute the same model

    def needs_calibration(self, config):
        return config.selection in DATA_DRIVEN_SELECTIONS

    def reads_base_weights(self, config) -> bool:
        return config.selection != "random"

    def init(self, key, base, model, config, calibration_batches=None):
        if config.layout != "permuted":
            raise JftError("s2ft adapters are created in the permuted layout; "
                           "split() gives the indexed one")
        check_modules(model, config)
        chosen = select_units(key, base, model, config, calibration_batches)
        layers = {}
        for group, (perm, count) in _permutations(chosen, model).items():
            layers[group] = {"perm": jnp.asarray(perm), "count": jnp.asarray(count)}
            capacity = max(int(count.max()), 1)
            for module in config.groups()[group]:
                site = linear_site(model, module)
                layers[module] = jnp.zeros(_block_shape(model, site, capacity), jnp.float32)
        return {"layers": layers}

    def rebase(self, base, delta, model, config):
        if config.layout == "indexed":
            return base
        perms = {g: delta["layers"][g]["perm"] for g in config.groups()}
        return permute(base, perms, model)

    def split(self, delta, model, config):
        """The indexed layout: each layer's unit ids instead of a permutation."""
        if config.layout == "indexed":
            return delta, config
        layers = dict(delta["layers"])
        for group, modules in config.groups().items():
            site = linear_site(model, modules[0])
            capacity = _capacity(site, layers[site.name].shape[_unit_axis(site)], model)
            entry = layers[group]
            layers[group] = {"units": entry["perm"][:, :capacity], "count": entry["count"]}
        return {"layers": layers}, dataclasses.replace(config, layout="indexed")

    def trainable(self, delta, config):
        # The blocks train; the unit bookkeeping (perm or units, count) does not.
        return {"layers": {name: jax.tree.map(lambda _, n=name: n not in ("attention", "mlp"),
                                              value)
                           for name, value in delta["layers"].items()}}

    def wraps_linear(self, site, delta, delta_layer, config):
        return site.name in delta_layer

    def linear(self, site, x, inner, delta, delta_layer, layer, config):
        model = layer.config
        block = _masked_block(site, delta_layer, model, x.dtype)
        if inner.is_plain and _fused(site, layer, config):
            return _fused_linear(site, x, inner, block, model)
        y = inner(x)
        slots = block.shape[_unit_axis(site) - 1]
        where = _slot_index(delta_layer[group_of(site)], site, model, config)
        axis = unit_axis(site)
        if input_side(site):  # y += x[..., units] B
            at = x.ndim - len(site.in_axes) + site.in_axes.index(axis)
            picked = (jax.lax.slice_in_dim(x, 0, slots, axis=at) if where is None
                      else jnp.take(x, where, axis=at))
            return y + jnp.einsum(site.equation, picked, block)
        extra = jnp.einsum(site.equation, x, block)  # y[..., units] += x B
        at = len(site.lead) + site.out_axes.index(axis)
        if where is None:
            start = (0,) * y.ndim
            head = jax.lax.slice_in_dim(y, 0, slots, axis=at)
            return jax.lax.dynamic_update_slice(y, head + extra, start)
        index = (slice(None),) * at + (where,)
        return y.at[index].add(extra)

    def merge(self, base, delta, model, config):
        return _fold(base, delta, model, config, 1.0)

    def unmerge(self, base, delta, model, config):
        return _fold(base, delta, model, config, -1.0)

    def num_params(self, delta, model, config):
        total = 0
        for group, modules in config.groups().items():
            selected = int(np.sum(np.asarray(delta["layers"][group]["count"])))
            for module in modules:
                size = math.prod(linear_site(model, module).sizes(model))
                total += selected * size // _units(model, group)
        return total

    def identity(self, delta, base, model, config):
        return {"layers": {k: jax.tree.map(jnp.zeros_like, v) if k not in ("attention", "mlp")
                           else v for k, v in delta["layers"].items()}}

    def delta_axes(self, delta, model, config):
        # A block is its base's slice, so it keeps the base's names (the unit axis too: the
        # rules replicate it where C units do not divide); unit ids and counts are small.
        return {"layers": {name: jax.tree.map(lambda x: (None,) * x.ndim, value)
                           if name in ("attention", "mlp") else linear_site(model, name).weight_axes
                           for name, value in delta["layers"].items()}}


def _fused(site, layer, config) -> bool:
    """Whether the block runs in the fused kernel (`kernels`) over the plain linear: the
    permuted layout only, whose block covers the first slots, and units that are
    contiguous in the flattened input (or output) features (a head's H, a channel)."""
    axes = site.in_axes if input_side(site) else site.out_axes
    return (config.layout == "permuted" and axes[0] == unit_axis(site)
            and use_kernel("s2ft_linear", layer.config))


def _fused_linear(site, x, inner, block, model):
    from jft.pallas_kernels.s2ft_linear import s2ft_input_side, s2ft_output_side

    dims_in, dims_out = site.dims(model)
    size_in, size_out = site.sizes(model)
    lead = x.shape[:x.ndim - len(dims_in)]
    x = x.reshape(*lead, size_in)
    weight = site.to_in_out(inner.weight.astype(x.dtype)).reshape(size_in, size_out)
    block = site.to_in_out(block)
    # `pallas` forces the fused backward; under `auto` the kernel fuses only blocks
    # narrow enough for the fusion to pay (pallas_kernels/s2ft_linear.py).
    fuse = True if model.kernels == "pallas" else None
    if input_side(site):
        y = s2ft_input_side(x, weight, block.reshape(-1, size_out), fuse=fuse)
    else:
        y = s2ft_output_side(x, weight, block.reshape(size_in, -1), fuse=fuse)
    y = y.reshape(*lead, *dims_out)
    return y if inner.bias is None else y + inner.bias.astype(x.dtype)


def _masked_block(site, delta_layer, model, dtype):
    """This layer's block, zero on the slots of units it did not select."""
    block = delta_layer[site.name]
    slots = block.shape[_unit_axis(site) - 1]
    mask = _slot_mask(delta_layer[group_of(site)]["count"], site, model,
                      _capacity(site, slots, model), block.ndim, stacked=False)
    return (block * mask).astype(dtype)


def _block_shape(model, site, capacity):
    shape = [model.num_layers, *site.weight_shape(model)]
    shape[_unit_axis(site)] = _slots(model, site, capacity)
    return tuple(shape)


def _capacity(site: LinearSite, slots: int, model: ModelConfig) -> int:
    """Units a block holds, from its size along the unit axis."""
    return slots // _per_unit(model, site)


def _fold(base, delta, model, config, sign):
    """The base with the blocks added (sign 1) or taken out (-1), in float32."""
    layers = dict(base["layers"])
    for group, modules in config.groups().items():
        entry = delta["layers"][group]
        for module in modules:
            site = linear_site(model, module)
            block = delta["layers"][module]
            axis = _unit_axis(site)
            slots = block.shape[axis]
            mask = _slot_mask(entry["count"], site, model, _capacity(site, slots, model),
                              block.ndim)
            update = sign * block.astype(jnp.float32) * mask
            weight = layers[module]
            if config.layout == "permuted":
                head = jax.lax.slice_in_dim(weight, 0, slots, axis=axis).astype(jnp.float32)
                layers[module] = jax.lax.dynamic_update_slice_in_dim(
                    weight, (head + update).astype(weight.dtype), 0, axis)
            else:
                index = entry["units"]
                if _per_unit(model, site) > 1:
                    index = _head_order(index, _per_unit(model, site))
                layers[module] = _scatter_add(weight, index, update, axis)
    return dict(base, layers=layers)


@partial(jax.jit, static_argnums=3)
def _scatter_add(weight, index, update, axis):
    def one(w, i, u):  # one layer; unit axis moved first
        w, u = jnp.moveaxis(w, axis - 1, 0), jnp.moveaxis(u, axis - 1, 0)
        out = w.astype(jnp.float32).at[i].add(u).astype(w.dtype)
        return jnp.moveaxis(out, 0, axis - 1)

    return jax.vmap(one)(weight, index, update)


def _slot_mask(count, site, model, capacity, ndim, stacked=True):
    """Float mask over a block's unit axis: 1 on the slots of selected units."""
    valid = jnp.arange(capacity) < (count[:, None] if stacked else count)
    if _per_unit(model, site) > 1:
        valid = jnp.repeat(valid, _per_unit(model, site), axis=-1)
    axis = _unit_axis(site) - (0 if stacked else 1)
    shape = [1] * ndim
    if stacked:
        shape[0] = valid.shape[0]
    shape[axis] = valid.shape[-1]
    return valid.reshape(shape).astype(jnp.float32)


def _slot_index(group, site, model, config):
    """None in the permuted layout (the block covers the first slots); else the ids of
    the units (query heads on a heads axis) the block's slots belong to."""
    if config.layout == "permuted":
        return None
    units = group["units"]
    if _per_unit(model, site) > 1:
        return _head_order(units[None], _per_unit(model, site))[0]
    return units


S2FT_METHOD = register(S2FT())
