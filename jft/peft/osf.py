"""OSF, orthogonal-subspace fine-tuning ("Sculpting Subspaces", Nayak et al. 2025, arXiv
2504.07097; PEFT's `osf` tuner): full fine-tuning of each targeted weight, confined to
the complement of its top singular directions.

At init each targeted weight W [in, out] (jft's layout) is factored, W = P S Qᵀ, and its
top `preserved_rank` fraction of singular directions, P_h [in, k] and Q_h [out, k], is
frozen. The trainable leaf is a dense matrix `w` [*in, *out], and the model applies

    ΔW = (I - P_h P_hᵀ) w (I - Q_h Q_hᵀ),

so every update, whatever the optimiser does to the gradient (Adam's rescaling, weight
decay), leaves the preserved subspace alone: P_hᵀ ΔW = 0 and ΔW Q_h = 0. That is the
paper's update space (its U_l, V_l gradients projected off U_h, V_h) without its caveat:
projecting a raw gradient before Adam does not keep the step orthogonal; projecting
through the parameterisation does. For continual learning, merge after each task and
take the SVD again with a larger preserved fraction (`jft.continual`'s `osf` strategy).

The delta, per targeted module: `w` [L, *in, *out] float32 (trainable), `p` [L, in, k]
and `q` [L, out, k] (frozen bases, inputs and outputs flattened).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jft.errors import JftError
from jft.models.sites import linear_site
from jft.peft.base import MethodBase, Targets, as_targets, layer_mask, register


@dataclasses.dataclass(frozen=True)
class OsfConfig:
    targets: Targets = Targets("all-linear")
    # The fraction of each weight's singular directions kept frozen (PEFT's default
    # effective_rank: half of min(d_in, d_out)).
    preserved_rank: float = 0.5

    def __post_init__(self):
        object.__setattr__(self, "targets", as_targets(self.targets))
        value = self.preserved_rank
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise JftError(f"osf preserved_rank must be a fraction in [0, 1), got {value!r}")


def preserved(size_in: int, size_out: int, config: OsfConfig) -> int:
    """How many singular directions of an [in, out] weight stay frozen."""
    return math.floor(config.preserved_rank * min(size_in, size_out))


def project(w: jax.Array, p: jax.Array, q: jax.Array) -> jax.Array:
    """(I - p pᵀ) w (I - q qᵀ) for w [in, out], p [in, k], q [out, k] (leading axes batch)."""
    w = w - p @ (jnp.swapaxes(p, -1, -2) @ w)
    return w - (w @ q) @ jnp.swapaxes(q, -1, -2)


class Osf(MethodBase):
    name = "osf"
    Config = OsfConfig

    def init(self, key, base, model, config, calibration_batches=None):
        layers = {}
        for module in config.targets.resolve(model):
            site = linear_site(model, module)
            dims_in, dims_out = site.dims(model)
            size_in, size_out = site.sizes(model)
            weight = jnp.asarray(base["layers"][module], jnp.float32).reshape(
                model.num_layers, size_in, size_out)
            k = preserved(size_in, size_out, config)
            p, _, qt = jnp.linalg.svd(weight, full_matrices=False)
            layers[module] = {
                "w": jnp.zeros((model.num_layers, *dims_in, *dims_out), jnp.float32),
                "p": p[..., :k],
                "q": jnp.swapaxes(qt[..., :k, :], -1, -2),
            }
        return {"layers": layers}

    def wraps_linear(self, site, delta, delta_layer, config):
        return site.name in delta_layer

    def linear(self, site, x, inner, delta, delta_layer, layer, config):
        entry = delta_layer[site.name]
        active = jnp.asarray(config.targets.resolve(layer.config)[site.name])[layer.index]
        size_in, size_out = site.sizes(layer.config)
        lead = x.shape[:len(site.lead)]
        flat = x.reshape(*lead, size_in).astype(jnp.float32)
        p, q = entry["p"], entry["q"]
        flat = flat - (flat @ p) @ p.T  # the input's part outside the preserved inputs
        z = flat @ entry["w"].reshape(size_in, size_out)
        z = z - (z @ q) @ q.T  # and the output's outside the preserved outputs
        dims_out = site.dims(layer.config)[1]
        update = (z * active).astype(x.dtype).reshape(*lead, *dims_out)
        return inner(x) + update

    def trainable(self, delta, config):
        return {"layers": {m: {"w": True, "p": False, "q": False} for m in delta["layers"]}}

    def merge(self, base, delta, model, config):
        return self._fold(base, delta, model, config, 1.0)

    def unmerge(self, base, delta, model, config):
        return self._fold(base, delta, model, config, -1.0)

    def _fold(self, base, delta, model, config, sign):
        layers = dict(base["layers"])
        for module, entry in delta["layers"].items():
            weight = layers[module]
            update = effective_update(entry) * layer_mask(
                config.targets.resolve(model)[module], entry["w"].shape)
            layers[module] = (weight.astype(jnp.float32) + sign * update).astype(weight.dtype)
        return dict(base, layers=layers)

    def num_params(self, delta, model, config):
        total = 0
        for module, active in config.targets.resolve(model).items():
            total += int(np.sum(active)) * math.prod(linear_site(model, module).sizes(model))
        return total

    def identity(self, delta, base, model, config):
        return jax.tree.map(lambda x: x, delta) | {"layers": {
            m: dict(e, w=jnp.zeros_like(e["w"])) for m, e in delta["layers"].items()}}

    def delta_axes(self, delta, model, config):
        layers = {}
        for module in delta["layers"]:
            site = linear_site(model, module)
            flat_in = site.in_axes[0] if len(site.in_axes) == 1 else site.in_axes
            flat_out = site.out_axes[0] if len(site.out_axes) == 1 else site.out_axes
            layers[module] = {"w": ("layers", *site.in_axes, *site.out_axes),
                              "p": ("layers", flat_in, None), "q": ("layers", flat_out, None)}
        return {"layers": layers}


def effective_update(entry) -> jax.Array:
    """ΔW [L, *in, *out] of one module's delta entry: `w` projected off the bases."""
    w = entry["w"]
    layers, size_in, size_out = w.shape[0], entry["p"].shape[1], entry["q"].shape[1]
    flat = project(w.reshape(layers, size_in, size_out), entry["p"], entry["q"])
    return flat.reshape(w.shape)


OSF = register(Osf())
