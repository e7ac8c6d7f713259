"""Grouped matmul: rows sorted by group, each group multiplied by its own matrix.

`grouped_matmul(x [M, K], w [G, K, N], group_sizes [G])` is `jax.lax.ragged_dot` on GPU
and TPU, where XLA lowers it to a grouped kernel. XLA:CPU has no such kernel: JAX's
fallback there masks `x` once per group and runs G dense matmuls ([G, M, K] of mostly
zeros), more work than running every token through every expert. On CPU the rows are
therefore taken a tile at a time instead (megablox's scheme): each work item is one
(group, row tile) pair, at most M / tile + G - 1 of them, so the work is about M K N
plus one partial tile per group. The gradient is written out (`custom_vjp`): dx is the
same product with the transposed weights, dw a tiled pass summing x_g^T dy_g (on GPU and
TPU, ragged_dot's own transpose); the backward pass keeps only x, w and the group sizes.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

TILE = 64  # rows per work item on CPU


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array,
                   in_dims: int = 1) -> jax.Array:
    """x [M, *in] (rows sorted by group, group g's rows next), w [G, *in, *out],
    group_sizes [G] summing to M -> [M, *out]: row m times w[group of m].

    One `custom_vjp` around the whole product, whose residuals are its inputs as given:
    under the layer scan `w` is the layer's slice of the params, which the backward pass
    reads again, where residuals made after a reshape or inside the platform switch were
    a second, stacked copy of every layer's experts."""
    return _grouped(x, w, group_sizes, in_dims)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped(x, w, group_sizes, in_dims):
    rows, out_dims = x.shape[0], w.shape[1 + in_dims:]
    y = _product(x.reshape(rows, -1), _matrix(w, in_dims, x.dtype), _sizes(group_sizes))
    return y.reshape(rows, *out_dims)


def _grouped_fwd(x, w, group_sizes, in_dims):
    return _grouped(x, w, group_sizes, in_dims), (x, w, group_sizes)


def _grouped_bwd(in_dims, residuals, dy):
    x, w, group_sizes = residuals
    rows, sizes = x.shape[0], _sizes(group_sizes)
    matrix = _matrix(w, in_dims, x.dtype)
    flat_dy = dy.reshape(rows, -1).astype(x.dtype)
    dx = _product(flat_dy, jnp.swapaxes(matrix, 1, 2), sizes)
    dw = jax.lax.platform_dependent(
        x.reshape(rows, -1), flat_dy, sizes,
        cpu=partial(_weight_gradient, groups=w.shape[0], tile=TILE),
        default=partial(_ragged_weight_gradient, groups=w.shape[0]))
    return dx.reshape(x.shape).astype(x.dtype), dw.reshape(w.shape).astype(w.dtype), None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def _matrix(w, in_dims: int, dtype):
    """w [G, *in, *out] as [G, in, out] matrices in `dtype`."""
    return w.reshape(w.shape[0], math.prod(w.shape[1:1 + in_dims]), -1).astype(dtype)


def _sizes(group_sizes):
    return group_sizes.astype(jnp.int32)


def _product(x, matrices, sizes):
    """x [M, K] by per-group [G, K, N]: XLA's grouped kernel where it has one."""
    return jax.lax.platform_dependent(
        x, matrices, sizes,
        cpu=partial(_forward, tile=TILE),
        default=lambda x, w, sizes: jax.lax.ragged_dot(x, w, sizes))


def _ragged_weight_gradient(x, dy, sizes, groups):
    """dw [G, K, N] of `ragged_dot` (its own transpose: a ragged contraction)."""
    zeros = jnp.zeros((groups, x.shape[1], dy.shape[1]), x.dtype)
    return jax.vjp(lambda w: jax.lax.ragged_dot(x, w, sizes), zeros)[1](dy)[0]


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
    """The tiled CPU product: one (group, row tile) work item per scan step."""
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


def _weight_gradient(x, dy, group_sizes, *, groups, tile):
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
