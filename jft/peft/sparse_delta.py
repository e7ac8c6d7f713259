"""A sparse delta: per targeted linear and layer, `values` added to the weight at fixed
flat `indices` (repeated indices add up). What `python -m jft.merge` writes when a merged
task vector is sparse (a sum of SpIEL or S²FT deltas, a trimmed TIES merge), so the sum
is applied exactly without densifying it; it also trains, as a fixed random support
(SpIEL without regrowth).

The delta, per targeted module: `values` [L, K] float32 (trainable) and `indices`
[L, K] int32 into the layer's weight flattened ([*in, *out], jft's layout). K is the
module's own (the merge's most entries in one layer; padding repeats index 0 with value
0); `count` sets K for a fresh delta.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from jft.errors import JftError
from jft.models.sites import linear_site, site_names
from jft.peft.base import MethodBase, Targets, as_targets, numpy_rng, register


@dataclasses.dataclass(frozen=True)
class SparseDeltaConfig:
    targets: Targets = Targets("all-linear")
    count: int = 64  # entries per targeted weight and layer, for a fresh delta

    def __post_init__(self):
        object.__setattr__(self, "targets", as_targets(self.targets))
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise JftError(f"sparse_delta count must be a positive integer, got {self.count!r}")


def scatter(weight, indices, values, sign: float = 1.0):
    """One layer's weight [*in, *out] with `values` added at flat `indices`, in float32."""
    at = jnp.unravel_index(indices, weight.shape)
    return weight.astype(jnp.float32).at[at].add(sign * values.astype(jnp.float32))


class SparseDelta(MethodBase):
    name = "sparse_delta"
    Config = SparseDeltaConfig

    def init(self, key, base, model, config, calibration_batches=None):
        rng = numpy_rng(key)
        layers = {}
        for module, active in config.targets.resolve(model).items():
            size = math.prod(linear_site(model, module).weight_shape(model))
            if config.count > size:
                raise JftError(f"sparse_delta count {config.count} exceeds the {size} entries "
                               f"of {module}")
            indices = np.stack([rng.choice(size, config.count, replace=False)
                                for _ in range(model.num_layers)]).astype(np.int32)
            layers[module] = {
                "values": jnp.zeros((model.num_layers, config.count), jnp.float32),
                "indices": jnp.asarray(indices * active[:, None]),  # untargeted: index 0
            }
        return {"layers": layers}

    def wraps_linear(self, site, delta, delta_layer, config):
        return site.name in delta_layer

    def linear(self, site, x, inner, delta, delta_layer, layer, config):
        entry = delta_layer[site.name]
        if inner.is_plain:  # one matmul with the edited weight
            dense = scatter(inner.weight, entry["indices"], entry["values"])
            y = jnp.einsum(site.equation, x, dense.astype(x.dtype))
            return y if inner.bias is None else y + inner.bias.astype(x.dtype)
        sparse = scatter(jnp.zeros(inner.weight.shape, jnp.float32), entry["indices"],
                         entry["values"])
        return inner(x) + jnp.einsum(site.equation, x, sparse.astype(x.dtype))

    def trainable(self, delta, config):
        return {"layers": {m: {"values": True, "indices": False} for m in delta["layers"]}}

    def merge(self, base, delta, model, config):
        return _fold(base, delta, 1.0)

    def unmerge(self, base, delta, model, config):
        return _fold(base, delta, -1.0)

    def num_params(self, delta, model, config):
        return sum(int(np.prod(e["values"].shape)) for e in delta["layers"].values())

    def identity(self, delta, base, model, config):
        return {"layers": {m: dict(e, values=jnp.zeros_like(e["values"]))
                           for m, e in delta["layers"].items()}}

    def delta_axes(self, delta, model, config):
        # Entries sit anywhere in the weight: spread by count over its mesh axes, as SpIEL's.
        return {"layers": {
            m: dict.fromkeys(e, ("layers", linear_site(model, m).weight_axes[1:]))
            for m, e in delta["layers"].items()}}


def _fold(base, delta, sign: float):
    layers = dict(base["layers"])
    for module, entry in delta["layers"].items():
        weight = layers[module]
        folded = [scatter(weight[i], entry["indices"][i], entry["values"][i], sign)
                  for i in range(weight.shape[0])]
        layers[module] = jnp.stack(folded).astype(weight.dtype)
    return dict(base, layers=layers)


def from_task_vector(vector: dict[tuple[str, ...], np.ndarray], model) -> dict | None:
    """The sparse delta holding a task vector exactly, or None when that would not be
    smaller than dense storage (more than half of a weight's entries set, or changes
    outside the linears: norms, embeddings)."""
    sites = set(site_names(model))
    layers = {}
    for key, value in vector.items():
        if len(key) != 2 or key[0] != "layers" or key[1] not in sites:
            return None
        flat = value.reshape(value.shape[0], -1)
        counts = (flat != 0).sum(1)
        if counts.max() * 2 > flat.shape[1]:
            return None
        width = max(int(counts.max()), 1)
        indices = np.zeros((flat.shape[0], width), np.int32)
        values = np.zeros((flat.shape[0], width), np.float32)
        for i, row in enumerate(flat):
            where = np.flatnonzero(row)
            indices[i, :len(where)], values[i, :len(where)] = where, row[where]
        layers[key[1]] = {"values": values, "indices": indices}
    return {"layers": layers}


SPARSE_DELTA = register(SparseDelta())
