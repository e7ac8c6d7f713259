"""Shardings of whole trees (params, deltas, batches), placing them, and counting bytes.

Every tensor is named by its path in warnings, so a dimension a mesh axis does not
divide is reported with the tensor it belongs to (and stays replicated on that axis).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jft.sharding.logical import LogicalRules


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(
        e is None or isinstance(e, str) or isinstance(e, tuple) for e in x)


def tree_shardings(rules: LogicalRules, tree: Any, axes: Any, name: str = "") -> Any:
    """NamedShardings for `tree` (arrays or ShapeDtypeStructs) from a tree of logical axes
    shaped like it; `name` prefixes the tensor names in warnings."""

    def one(path, axes_leaf, leaf):
        label = name + jax.tree_util.keystr(path, simple=True, separator="/")
        return rules.sharding(axes_leaf, leaf.shape, label)

    return jax.tree_util.tree_map_with_path(one, axes, tree, is_leaf=_is_axes)


def replicated(rules: LogicalRules) -> NamedSharding:
    return NamedSharding(rules.mesh, PartitionSpec())


def batch_shardings(rules: LogicalRules, batch: Mapping[str, np.ndarray]) -> dict:
    """[B, T] batch arrays split over (data, fsdp) by their `batch` dimension."""
    return {key: rules.sharding(("batch", "seq")[: value.ndim], value.shape, f"batch/{key}")
            for key, value in batch.items()}


def put(tree: Any, shardings: Any) -> Any:
    """`tree` placed with `shardings`. Values on one host (numpy, or arrays of this process
    only when there are several) must be the same on every process: each process hands
    its own devices their slices, so nothing is ever sent between hosts."""

    def place(x, sharding):
        if isinstance(x, jax.Array):
            if x.sharding == sharding:
                return x
            if jax.process_count() == 1 or not x.is_fully_addressable:
                return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree, shardings)


def bytes_per_device(tree: Any) -> dict[jax.Device, int]:
    """Bytes each addressable device holds of the arrays in `tree`."""
    held: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held


def total_bytes(tree: Any) -> int:
    """Bytes of `tree` as one copy of every array, however it is sharded."""
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))
