"""What LISA and HFT share: layer weights parked in the delta, a few of them trained.

Both methods train, at any time, a subset of the decoder layers' weights and switch the
subset now and then. Their delta holds:

- `parked` {name: [L, ...]}: the layer weights they touch, in the base's dtype. Not
  trainable: the optimiser never sees them. At init they are the base's own arrays (no
  copy), and `rebase` drops those entries from the base, so the weights exist once.
- `active` {name: [S, ...]} float32, trainable: a copy of the S layer slices trained now,
  gathered from `parked`. Slot s holds layer `active_layers[s]` (-1: a padding slot that
  no layer hits and that is never written back).
- `active_layers`: int32 [S] (one set for all names, LISA) or {name: int32 [S]} (HFT).

Inside the layer scan a layer uses `active[name][slot]` where its (traced) index is one
of the active layers, else its parked slice. Linears go through `gated_matmul`, whose
backward pass computes the weight gradient only on active layers; small params (norms,
biases) take a plain `jnp.where`. At a switch (`refresh`) the active slices are written
back into `parked` (cast to its dtype), the new layers gathered, and the optimiser state
of `active` restarts. Shapes never change, so nothing recompiles.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jft.models import param_axes
from jft.models.sites import site_names
from jft.models.transformer import logical_axes
from jft.peft.base import MethodBase

# Top-level params a method may also train whole (LISA's embeddings, head, final norm).
TOP_LEVEL = ("embed", "lm_head", "final_norm")


# ---------------------------------------------------------------- the gated matmul


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def gated_matmul(equation: str, x: jax.Array, parked_w: jax.Array, active: jax.Array,
                 hit: jax.Array, slot: jax.Array) -> jax.Array:
    """`einsum(equation, x, where(hit, active[slot], parked_w))`, both weights cast to
    x's dtype; the backward pass computes d active only where `hit` (a `lax.cond`, so the
    weight-gradient matmul runs on active layers alone) and treats `parked_w` as constant.

    `active` is the whole [S, ...] stack with `slot` picking the slice (rather than the
    slice itself): inside the layer scan the stack is loop-invariant, so it is not saved
    per layer for the backward pass (a slice would be: a float32 copy of every layer).
    """
    return jnp.einsum(equation, x, _effective(x, parked_w, active, hit, slot))


def _effective(x, parked_w, active, hit, slot):
    chosen = lax.dynamic_index_in_dim(active, slot, 0, keepdims=False).astype(x.dtype)
    return jnp.where(hit, chosen, parked_w.astype(x.dtype))


def _gated_fwd(equation, x, parked_w, active, hit, slot):
    return gated_matmul(equation, x, parked_w, active, hit, slot), (x, parked_w, active, hit,
                                                                    slot)


def _gated_bwd(equation, residuals, dy):
    x, parked_w, active, hit, slot = residuals
    weight = _effective(x, parked_w, active, hit, slot)
    (dx,) = jax.vjp(lambda x_: jnp.einsum(equation, x_, weight), x)[1](dy)

    def weight_grad():
        (dw,) = jax.vjp(lambda w: jnp.einsum(equation, x, w), weight)[1](dy)
        return dw.astype(active.dtype)

    dw = lax.cond(hit, weight_grad, lambda: jnp.zeros(active.shape[1:], active.dtype))
    # The scan adds this to its running cotangent of `active`; XLA turns the add of a
    # one-slice update into an in-place update of that slice.
    d_active = lax.dynamic_update_index_in_dim(jnp.zeros_like(active), dw, slot, 0)
    return dx, None, d_active, None, None


gated_matmul.defvjp(_gated_fwd, _gated_bwd)


def lookup(layers: jax.Array, index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(hit, slot): whether layer `index` is among `layers` [S], and its slot there."""
    matches = layers == index
    return matches.any(), jnp.argmax(matches)


# ---------------------------------------------------------------- parking and switching


def gather(parked: jax.Array, layers: jax.Array) -> jax.Array:
    """float32 copies [S, ...] of the parked slices at `layers` (zeros at padding, -1)."""
    safe = jnp.where(layers >= 0, layers, parked.shape[0])
    return jnp.take(parked, safe, axis=0, mode="fill", fill_value=0).astype(jnp.float32)


def scatter(parked: jax.Array, active: jax.Array, layers: jax.Array) -> jax.Array:
    """`parked` with the active slices written back at `layers`, in parked's dtype
    (padding slots dropped)."""
    safe = jnp.where(layers >= 0, layers, parked.shape[0])
    return parked.at[safe].set(active.astype(parked.dtype), mode="drop")


@partial(jax.jit, donate_argnums=0)
def _switch(parked, active, old_layers, new_layers):
    # Donated: the write-back updates the parked weights in place instead of holding a
    # second copy of every layer.
    parked = {n: scatter(parked[n], active[n], old_layers[n]) if n in active else w
              for n, w in parked.items()}
    active = {n: gather(parked[n], new_layers[n]) for n in active}
    return parked, active


def switch(delta: dict, new_layers) -> tuple[dict, dict]:
    """(delta, resets) with the active slices written back and `new_layers` gathered
    (same structure as `delta["active_layers"]`); resets marks `active`, whose optimiser
    state restarts.

    The delta's parked arrays are donated (updated in place): pass a delta the caller
    owns, such as a train state's (`init_state` copies them), never one whose parked
    arrays are still the base's."""
    names = list(delta["active"])
    parked, active = _switch(delta["parked"], delta["active"],
                             per_name(delta["active_layers"], names),
                             per_name(new_layers, names))
    new = dict(delta, parked=parked, active=active, active_layers=new_layers)
    resets = jax.tree.map(lambda _: False, delta)
    resets["active"] = jax.tree.map(lambda _: True, delta["active"])
    return new, resets


def per_name(layers, names) -> dict:
    """{name: int32 [S]} from one shared index array or a dict of them."""
    if isinstance(layers, dict):
        return {n: jnp.asarray(layers[n], jnp.int32) for n in names}
    return {n: jnp.asarray(layers, jnp.int32) for n in names}


# ---------------------------------------------------------------- the method


class ActiveLayersMethod(MethodBase):
    edits_base_weights = True
    """The hooks, merge, rebase and counts of a delta laid out as described above; a
    subclass provides init, refresh_every and refresh."""

    @staticmethod
    def layers_of(delta: dict, name: str) -> jax.Array:
        layers = delta["active_layers"]
        return layers[name] if isinstance(layers, dict) else layers

    def edit_params(self, params, delta, model, config):
        out = dict(params, **{k: delta[k] for k in TOP_LEVEL if k in delta})
        # The scan slices the parked weights from the delta (layer_delta), so the base's
        # copies, if the caller passed an un-rebased base, are not scanned.
        out["layers"] = {k: v for k, v in params["layers"].items() if k not in delta["parked"]}
        return out

    def layer_delta(self, delta, model, config):
        return {"parked": delta["parked"]}

    def edit_layer(self, layer_params, delta, delta_layer, layer, config):
        out = dict(layer_params)
        linears = site_names(layer.config)
        for name, parked in delta_layer["parked"].items():
            if name in linears or name not in delta["active"]:
                out[name] = parked  # linears: gated_matmul picks the weight (`linear`)
                continue
            hit, slot = lookup(self.layers_of(delta, name), layer.index)
            chosen = lax.dynamic_index_in_dim(delta["active"][name], slot, 0, keepdims=False)
            out[name] = jnp.where(hit, chosen, parked.astype(jnp.float32))
        return out

    def wraps_linear(self, site, delta, delta_layer, config):
        return site.name in delta["active"]

    def linear(self, site, x, inner, delta, delta_layer, layer, config):
        """Over the plain linear, the matmul with the layer's weight (its active copy on
        active layers, differentiated there only). Stacked over other adapters, their
        output plus x times this method's change of the weight (active - parked on active
        layers): the parked weight is the base they wrap."""
        hit, slot = lookup(self.layers_of(delta, site.name), layer.index)
        parked = delta_layer["parked"][site.name]
        y = gated_matmul(site.equation, x, parked, delta["active"][site.name], hit, slot)
        if inner.is_plain:
            return y if inner.bias is None else y + inner.bias.astype(x.dtype)
        change = y - jnp.einsum(site.equation, x, parked.astype(x.dtype))
        return inner(x) + jnp.where(hit, change, 0)

    def refresh_every(self, config):
        return config.interval_steps

    def trainable(self, delta, config):
        mask = jax.tree.map(lambda _: True, delta)
        mask["parked"] = jax.tree.map(lambda _: False, delta["parked"])
        mask["active_layers"] = jax.tree.map(lambda _: False, delta["active_layers"])
        return mask

    def delta_axes(self, delta, model, config):
        # Parked weights and top-level copies shard exactly as the base would; an active
        # slot holds whichever layer is drawn, so its leading axis is not "layers".
        axes = param_axes({k: v for k, v in delta.items() if k in TOP_LEVEL})
        axes["parked"] = param_axes(delta["parked"], model)
        names = logical_axes(model)
        axes["active"] = {name: (None, *names[name][1:]) for name in delta["active"]}
        axes["active_layers"] = jax.tree.map(lambda _: (None,), delta["active_layers"])
        return axes

    def rebase(self, base, delta, model, config):
        """The base without the parked entries: the delta holds those weights."""
        return dict(base, layers={k: v for k, v in base["layers"].items()
                                  if k not in delta["parked"]})

    def merge(self, base, delta, model, config):
        """A full params tree: active slices written into the parked weights, top-level
        copies in place of the base's, all in the base's dtypes (where it has the entry)."""
        def dtype(tree, name, fallback):
            return tree[name].dtype if name in tree else fallback

        layers = dict(base["layers"])
        for name, parked in delta["parked"].items():
            weights = parked
            if name in delta["active"]:
                weights = scatter(parked.astype(jnp.float32), delta["active"][name],
                                  jnp.asarray(self.layers_of(delta, name)))
            layers[name] = weights.astype(dtype(base["layers"], name, parked.dtype))
        out = dict(base, layers=layers)
        for name in TOP_LEVEL:
            if name in delta:
                out[name] = delta[name].astype(dtype(base, name, delta[name].dtype))
        return out

    def num_params(self, delta, model, config):
        """Parameters trained at a time: the active slices (padding excluded) and any
        top-level copies."""
        total = sum(math.prod(delta[k].shape) for k in TOP_LEVEL if k in delta)
        for name, active in delta["active"].items():
            used = int(np.sum(np.asarray(self.layers_of(delta, name)) >= 0))
            total += used * math.prod(active.shape[1:])
        return total
