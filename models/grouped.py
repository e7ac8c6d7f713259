"""Grouped matmul: rows sorted by group, each group multiplied by its own matrix.

`grouped_matmul(x [M, K], w [G, K, N], group_sizes [G])` is `jax.lax.ragged_dot` on GPU
and TPU, where XLA lowers it to a grouped kernel. XLA:CPU has no such kernel: JAX's
fallback there masks `x` once per group and runs G dense matmuls ([G, M, K] of mostly
zeros), more work than running every token through every expert. On CPU the rows are
therefore taken a tile at a time instead (megablox's scheme): each work item is one
(group, row tile) pair, at most M / tile + G - 1 of them, so the work is about M K N
plus one partial tile per group. Its gradient is written out (`custom_vjp`) as two more
tiled passes, so the backward pass keeps only x, w and the group sizes, not a gathered
weight per tile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TILE = 64  # rows per work item on CPU


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [M, K] (rows sorted by group, group g's rows next), w [G, K, N], group_sizes
    [G] summing to M -> [M, N]: row m times w[group of m]."""
    group_sizes = group_sizes.astype(jnp.int32)
    w = w.astype(x.dtype)
    return jax.lax.platform_dependent(
        x, w, group_sizes,
        cpu=_tiled_grouped_matmul,
        default=lambda x, w, sizes: jax.lax.ragged_dot(x, w, sizes),
    )


def _work_items(group_sizes: jax.Array, rows: int, tile: int):
    """(group, tile index, valid) of each work item [W]: every row tile a group's rows
    touch, group by group."""
    groups = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    first = starts // tile
    last = jnp.maximum(ends - 1, 0) // tile
    count = jnp.where(group_sizes > 0, last - first + 1, 0)
    item_ends = jnp.cumsum(count)
    num_items = -(-rows // tile) + groups - 1
    item = jnp.arange(num_items)
    group = jnp.minimum(jnp.searchsorted(item_ends, item, side="right"), groups - 1)
    tile_index = first[group] + item - (item_ends[group] - count[group])
    valid = item < item_ends[-1]
    return group, jnp.where(valid, tile_index, 0), valid, starts, ends


def _tile_rows(x: jax.Array, tile: int) -> jax.Array:
    """x [M, ...] padded to whole tiles."""
    return jnp.pad(x, ((0, -x.shape[0] % tile),) + ((0, 0),) * (x.ndim - 1))


def _row_mask(tile_index, group, valid, starts, ends, tile: int):
    rows = tile_index * tile + jnp.arange(tile)
    return (rows >= starts[group]) & (rows < ends[group]) & valid


def _forward(x, w, group_sizes, tile):
    rows = x.shape[0]
    group, tile_index, valid, starts, ends = _work_items(group_sizes, rows, tile)
    padded = _tile_rows(x, tile)

    def step(out, item):
        g, t, ok = item
        x_tile = jax.lax.dynamic_slice_in_dim(padded, t * tile, tile)
        y = jnp.dot(x_tile, w[g], preferred_element_type=jnp.float32)
        mask = _row_mask(t, g, ok, starts, ends, tile)[:, None]
        current = jax.lax.dynamic_slice_in_dim(out, t * tile, tile)
        return jax.lax.dynamic_update_slice_in_dim(
            out, current + jnp.where(mask, y, 0).astype(out.dtype), t * tile, 0), None

    out = jnp.zeros((padded.shape[0], w.shape[-1]), x.dtype)
    out, _ = jax.lax.scan(step, out, (group, tile_index, valid))
    return out[:rows]


def _weight_gradient(x, dy, group_sizes, groups, tile):
    """dw [G, K, N] = per group, x_g^T dy_g."""
    rows = x.shape[0]
    group, tile_index, valid, starts, ends = _work_items(group_sizes, rows, tile)
    x_padded, dy_padded = _tile_rows(x, tile), _tile_rows(dy, tile)

    def step(dw, item):
        g, t, ok = item
        mask = _row_mask(t, g, ok, starts, ends, tile)[:, None]
        x_tile = jnp.where(mask, jax.lax.dynamic_slice_in_dim(x_padded, t * tile, tile), 0)
        dy_tile = jax.lax.dynamic_slice_in_dim(dy_padded, t * tile, tile)
        update = jnp.dot(x_tile.T, dy_tile, preferred_element_type=jnp.float32)
        return dw.at[g].add(update), None

    dw = jnp.zeros((groups, x.shape[1], dy.shape[1]), jnp.float32)
    dw, _ = jax.lax.scan(step, dw, (group, tile_index, valid))
    return dw


@jax.custom_vjp
def _tiled(x, w, group_sizes):
    return _forward(x, w, group_sizes, TILE)


def _tiled_fwd(x, w, group_sizes):
    return _forward(x, w, group_sizes, TILE), (x, w, group_sizes)


def _tiled_bwd(residuals, dy):
    x, w, group_sizes = residuals
    dx = _forward(dy, jnp.swapaxes(w, 1, 2), group_sizes, TILE)
    dw = _weight_gradient(x, dy, group_sizes, w.shape[0], TILE)
    return dx.astype(x.dtype), dw.astype(w.dtype), None


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


def _tiled_grouped_matmul(x, w, group_sizes):
    return _tiled(x, w, group_sizes)
