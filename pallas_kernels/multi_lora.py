"""Multi-adapter LoRA deltas (S-LoRA / Punica style): one batch, a different adapter per row.

Serving many LoRA adapters over one base model batches rows that use different adapters.
The base matmul x @ W is shared and stays with XLA (cuBLAS on GPU); the functions here
compute only each row's low-rank delta, scales[i] * (x[m] @ a[i]) @ b[i] with i the row's
adapter. Adapters are stacked with their ranks zero-padded to a common r (zero rows and
columns add exactly nothing): a [G, K, r], b [G, r, N], scales [G] float32.

Numerics, shared by kernels and references: the adapters are used in x's dtype, both
products accumulate in float32, and the rank-r intermediate s = scale * (x @ a) is
rounded to x's dtype before the expand (as Punica, S-LoRA and jft's LoRA layer do), so
the expand runs at the input dtype's matmul rate.

Two kernels, each beside a plain-jnp reference:

- `gathered_lora` (decode, Punica's BGMV): `adapter_ids` [M] per row, -1 for none.
  TPU: grid (row blocks, rows in block). Each step gathers one row's a, b and scale
  through BlockSpec index maps that read the scalar-prefetched ids, computes the whole
  block's shrink against that adapter, keeps only its own row (a select, so garbage in
  the ragged last block cannot leak in) and accumulates the expand into an f32 block
  that stays in VMEM across the row axis. Consecutive rows with the same adapter reuse
  the fetched blocks (Pallas skips a copy whose block index did not change), so sorted
  ids read each adapter once. K and N are whole blocks, so nothing is padded but the
  ids; the VMEM bound is a's [K, r] block, whose r lanes pad to 128 (K = 14336 in bf16:
  3.5 MiB a buffer, two buffers). GPU (Triton): grid (M, N tiles); a program loads its
  row's id, indexes a/b with it, and does the shrink as a K-loop of broadcast products
  and sums (one row is too thin for tensor cores). The shrink (K*r work; a[i] is
  L2-resident after the first tile) is recomputed per N tile rather than paid for with
  a second launch and an [M, r] round trip; untuned.

- `grouped_lora` (prefill, Punica's SGMV): rows sorted into contiguous groups,
  `group_sizes` [G]; rows from sum(group_sizes) to M use no adapter (zero delta), which
  is where `sort_by_adapter` puts rows with id -1. Two pallas_calls, shrink
  s = scale * x @ a[g] into an [M, r] intermediate (M*r, negligible traffic), then
  expand s @ b[g]; fusing them would either recompute the shrink per N tile (K/N_tile
  times the expand's work) or keep a [block_m, N] accumulator in VMEM.
  Groups need not align with row blocks. Following megablox, the grid walks *visits*:
  (row block, group) pairs, in group order, of every group that has rows in the block,
  at most cdiv(M, block_m) + G of them (one extra per group boundary inside a block,
  plus the no-adapter remainder). A boundary block is visited once per group it holds;
  each visit writes only its group's rows (a select against the rows' group range), and
  the first visit of a block starts from zeros. TPU: the visit tables are scalar
  prefetched (PrefetchScalarGridSpec) and drive the index maps; revisits of a block are
  consecutive, so the output block stays resident in VMEM between them. On TPU
  hardware the visit axis is a dynamic grid of exactly the active visits (interpret
  mode has no dynamic grids, so there it is static and surplus visits repeat the last
  one: same blocks, same values rewritten). GPU: one program per visit (and N tile)
  loads the tables itself; visits of one block write disjoint rows with masked stores,
  so they may run concurrently; surplus visits exit at once.

Ragged shapes: TPU blocks never straddle K or N, since a K/N tile is a multiple of 128
dividing the dimension or the whole dimension, and ragged row blocks are masked by the
selects above, so the adapter stacks are never copied. Padding a [G, K, r] stack per
call would cost a pass over every adapter, more than the deltas themselves at decode.
GPU uses masked loads and stores (`pltriton.load/store`, out-of-range lanes read as
zero) for the same reason, with power-of-2 tiles of at least 16 (the Triton dot minimum)
over any r, K and N.

Default blocks (overridable): TPU gathered block_m 16 (a bf16 sublane tile); TPU
grouped block_m 128, block_k 512, block_n 512 (reduced to divisors of K and N);
GPU gathered block_k and block_n sized to keep the products in registers
(block_k * r <= 4096, block_n * r <= 8192); GPU grouped block_m 64, block_k 64,
block_n 128, num_warps 4, num_stages 2.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jft.pallas_kernels import compat
from jft.pallas_kernels.compat import (
    TPU_SUBLANES,
    TRITON_MIN_DOT,
    pltriton,
    tpu_tile,
)

_F32 = jnp.float32


# ---------------------------------------------------------------- references


def gathered_lora_reference(x, adapter_ids, a, b, scales):
    """Per-row LoRA delta as a one-hot stacked GEMM (sglang-jax's BGMV on XLA).

    x [M, K], adapter_ids [M] int32 (-1: no adapter, zero delta), a [G, K, r],
    b [G, r, N], scales [G] -> [M, N] in x.dtype, scales[i] * (x[m] @ a[i]) @ b[i].
    The shrink runs against all G adapters at once (width G*r) and a one-hot mask keeps
    each row's own, so the cost grows with G*r: a reference, fine for small G*r.
    """
    num_adapters, k, rank = a.shape
    a_all = a.astype(x.dtype).transpose(1, 0, 2).reshape(k, num_adapters * rank)
    b_all = b.astype(x.dtype).reshape(num_adapters * rank, -1)
    s_all = jnp.dot(x, a_all, preferred_element_type=_F32)
    own = adapter_ids[:, None] == jnp.arange(num_adapters)[None, :]  # -1 matches none
    own = jnp.repeat(own, rank, axis=1)
    column_scales = jnp.repeat(scales.astype(_F32), rank)
    s = jnp.where(own, s_all * column_scales, 0.0).astype(x.dtype)
    return jnp.dot(s, b_all, preferred_element_type=_F32).astype(x.dtype)


def grouped_lora_reference(x, group_sizes, a, b, scales):
    """Per-group LoRA delta with `jax.lax.ragged_dot` (XLA's grouped matmul).

    x [M, K] with rows sorted into contiguous groups, group_sizes [G] int32 (rows from
    sum(group_sizes) on, and any beyond M, use no adapter) -> [M, N] in x.dtype.
    """
    m = x.shape[0]
    num_adapters = a.shape[0]
    sizes = _clip_group_sizes(group_sizes, m)
    row_group = _row_groups(sizes, m)
    has_adapter = (row_group < num_adapters)[:, None]
    row_scales = jnp.append(scales.astype(_F32), 0.0)[row_group][:, None]  # G: none
    s = lax.ragged_dot(x, a.astype(x.dtype), sizes, preferred_element_type=_F32)
    s = jnp.where(has_adapter, s * row_scales, 0.0).astype(x.dtype)
    delta = lax.ragged_dot(s, b.astype(x.dtype), sizes, preferred_element_type=_F32)
    return jnp.where(has_adapter, delta, 0.0).astype(x.dtype)


def sort_by_adapter(adapter_ids, num_adapters):
    """(order [M], group_sizes [G] int32) that turn per-row ids into contiguous groups.

    adapter_ids [M] in [-1, num_adapters); -1 rows go last, outside every group, so
    `grouped_lora` gives them a zero delta. The sort is stable. Use:

        order, sizes = sort_by_adapter(ids, G)
        delta_sorted = grouped_lora(x[order], sizes, a, b, scales)
        delta = jnp.zeros_like(delta_sorted).at[order].set(delta_sorted)

    (the scatter puts sorted row j back at row order[j]; equivalently
    delta_sorted[jnp.argsort(order)]).
    """
    keys = jnp.where(adapter_ids < 0, num_adapters, adapter_ids).astype(jnp.int32)
    order = jnp.argsort(keys, stable=True).astype(jnp.int32)
    group_sizes = jnp.bincount(keys, length=num_adapters + 1)[:num_adapters]
    return order, group_sizes.astype(jnp.int32)


def _clip_group_sizes(group_sizes, m):
    """Group sizes with the groups cut at row M (rows beyond M do not exist)."""
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
    return jnp.diff(ends, prepend=0).astype(jnp.int32)


def _row_groups(sizes, m):
    """[M]: each row's group, G for the no-adapter remainder."""
    return jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(m, dtype=jnp.int32),
                            side="right").astype(jnp.int32)


# ---------------------------------------------------------------- block sizes


def _resolve_target(target):
    target = target or compat.platform()
    # On CPU only interpret mode runs; it executes the TPU bodies by default.
    return "tpu" if target == "cpu" else target



def _check_tpu_rows(block_m):
    if block_m % TPU_SUBLANES:
        raise ValueError(f"TPU block_m must be a multiple of {TPU_SUBLANES}, got {block_m}")
    return block_m


def _check_gpu_tile(name, size):
    if size < TRITON_MIN_DOT or size & (size - 1):
        raise ValueError(f"GPU {name} must be a power of 2 >= {TRITON_MIN_DOT}, got {size}")
    return size


def _rank_tile(rank, minimum=1):
    """Triton tiles are powers of 2: r rounded up (masked loads zero the excess)."""
    return max(minimum, pl.next_power_of_2(rank))


# ---------------------------------------------------------------- gathered (BGMV)


@functools.partial(jax.jit, static_argnames=("interpret", "target", "block_m", "block_k",
                                             "block_n"))
def gathered_lora(x, adapter_ids, a, b, scales, *, interpret=None, target=None,
                  block_m=None, block_k=None, block_n=None):
    """Decode-style (BGMV) multi-LoRA delta: `gathered_lora_reference` as a Pallas kernel.

    x [M, K], adapter_ids [M] int32 in [-1, G) (-1: zero delta), a [G, K, r],
    b [G, r, N], scales [G] -> [M, N] in x.dtype.
    interpret: run in the HLO interpreter (default: on CPU), or a
    `pltpu.InterpretParams` for the TPU simulator. target: 'tpu' or 'gpu' kernel body
    (default: this machine's; CPU interprets the TPU body). M = 0 returns an empty delta.
    block_m: rows per block (TPU; multiple of 8, default 16). block_k, block_n: the
    K-loop step and N tile (GPU; powers of 2 >= 16, defaults sized from r).
    """
    if x.shape[0] == 0:
        return jnp.zeros((0, b.shape[2]), x.dtype)
    interpret = compat.interpret_default() if interpret is None else interpret
    target = _resolve_target(target)
    if target == "gpu":
        return _gathered_gpu(x, adapter_ids, a, b, scales, interpret=interpret,
                             block_k=block_k, block_n=block_n)
    return _gathered_tpu(x, adapter_ids, a, b, scales, interpret=interpret,
                         block_m=_check_tpu_rows(block_m or 16))


def _gathered_tpu(x, adapter_ids, a, b, scales, *, interpret, block_m):
    m, k = x.shape
    num_adapters, _, rank = a.shape
    n = b.shape[2]
    row_blocks = pl.cdiv(m, block_m)
    # Only the ids are padded: rows past M have no adapter and are skipped.
    ids = jnp.pad(adapter_ids.astype(jnp.int32), (0, row_blocks * block_m - m),
                  constant_values=-1)

    def adapter(i, j, ids_ref):
        return jnp.maximum(ids_ref[i * block_m + j], 0), 0, 0

    def kernel(ids_ref, x_ref, a_ref, b_ref, scale_ref, o_ref, acc_ref):
        i, j = pl.program_id(0), pl.program_id(1)

        @pl.when(j == 0)
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(ids_ref[i * block_m + j] >= 0)
        def _():
            s = jnp.dot(x_ref[...], a_ref[...].astype(x_ref.dtype), preferred_element_type=_F32)
            own_row = lax.broadcasted_iota(jnp.int32, s.shape, 0) == j
            s = jnp.where(own_row, s * scale_ref[...], 0.0).astype(x_ref.dtype)
            acc_ref[...] += jnp.dot(s, b_ref[...].astype(x_ref.dtype),
                                    preferred_element_type=_F32)

        @pl.when(j == block_m - 1)
        def _():
            o_ref[...] = acc_ref[...].astype(o_ref.dtype)

    itemsize = x.dtype.itemsize
    cost = pl.CostEstimate(
        flops=2 * row_blocks * block_m * block_m * rank * (k + n), transcendentals=0,
        bytes_accessed=itemsize * (m * k + m * n + m * rank * (k + n)))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(row_blocks, block_m),
            in_specs=[
                pl.BlockSpec((block_m, k), lambda i, j, ids_ref: (i, 0)),
                pl.BlockSpec((None, k, rank), adapter),
                pl.BlockSpec((None, rank, n), adapter),
                pl.BlockSpec((None, 1, 1), adapter),
            ],
            out_specs=pl.BlockSpec((block_m, n), lambda i, j, ids_ref: (i, 0)),
            scratch_shapes=[pltpu.VMEM((block_m, n), _F32)],
        ),
        compiler_params=compat.compiler_params(
            "tpu", dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=cost,
        interpret=interpret,
    )(ids, x, a, b, scales.astype(_F32).reshape(num_adapters, 1, 1))


def _gathered_gpu(x, adapter_ids, a, b, scales, *, interpret, block_k, block_n):
    m, k = x.shape
    rank, n = b.shape[1:]
    rank_tile = _rank_tile(rank)
    block_k = _check_gpu_tile("block_k", block_k or _gpu_gathered_tile(k, 4096 // rank_tile))
    block_n = _check_gpu_tile("block_n", block_n or _gpu_gathered_tile(n, 8192 // rank_tile))
    k_steps = pl.cdiv(k, block_k)
    compute_dtype = x.dtype

    def kernel(ids_ref, scales_ref, x_ref, a_ref, b_ref, o_ref):
        row, n_tile = pl.program_id(0), pl.program_id(1)
        adapter = ids_ref[row]
        columns = n_tile * block_n + jnp.arange(block_n)
        in_n = columns < n
        in_rank = jnp.arange(rank_tile) < rank
        out = o_ref.at[row, pl.ds(n_tile * block_n, block_n)]

        @pl.when(adapter >= 0)
        def _():
            def shrink_step(step, s):
                in_k = step * block_k + jnp.arange(block_k) < k
                x_k = pltriton.load(x_ref.at[row, pl.ds(step * block_k, block_k)],
                                    mask=in_k, other=0)
                a_k = pltriton.load(
                    a_ref.at[adapter, pl.ds(step * block_k, block_k), pl.ds(0, rank_tile)],
                    mask=in_k[:, None] & in_rank[None, :], other=0)
                products = x_k.astype(_F32)[:, None] * a_k.astype(compute_dtype).astype(_F32)
                return s + jnp.sum(products, axis=0)

            s = lax.fori_loop(0, k_steps, shrink_step, jnp.zeros((rank_tile,), _F32))
            s = (s * scales_ref[adapter]).astype(compute_dtype).astype(_F32)
            b_tile = pltriton.load(
                b_ref.at[adapter, pl.ds(0, rank_tile), pl.ds(n_tile * block_n, block_n)],
                mask=in_rank[:, None] & in_n[None, :], other=0)
            delta = jnp.sum(s[:, None] * b_tile.astype(compute_dtype).astype(_F32), axis=0)
            pltriton.store(out, delta.astype(o_ref.dtype), mask=in_n)

        @pl.when(adapter < 0)
        def _():
            pltriton.store(out, jnp.zeros((block_n,), o_ref.dtype), mask=in_n)

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=(m, pl.cdiv(n, block_n)),
        compiler_params=compat.compiler_params("gpu", num_warps=4, num_stages=2),
        interpret=interpret,
    )(adapter_ids.astype(jnp.int32), scales.astype(_F32), x, a, b)


def _gpu_gathered_tile(dim, budget):
    """A power-of-2 tile within the register budget (a power of 2), no larger than the
    dim needs."""
    return max(TRITON_MIN_DOT, min(budget, pl.next_power_of_2(dim)))


# ---------------------------------------------------------------- grouped (SGMV)


def _group_visits(group_sizes, m, block_m):
    """Visit tables of the grouped kernels (megablox's group metadata, plus a remainder).

    Groups 0..G-1 are the adapters, group G the no-adapter rows from sum(sizes) to M.
    Returns offsets [G+2] (group g holds rows offsets[g]:offsets[g+1]), visit_groups and
    visit_blocks [cdiv(M, block_m) + G] (the visits in group order; each group visits
    every row block it has rows in, so revisits of a block are consecutive; surplus
    entries repeat the last visit) and num_visits (the number of real ones).
    """
    num_adapters = group_sizes.shape[0]
    row_blocks = pl.cdiv(m, block_m)
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
    offsets = jnp.concatenate([jnp.zeros(1, jnp.int32), ends, jnp.full(1, m, jnp.int32)])
    starts, stops = offsets[:-1], offsets[1:]
    first_block = starts // block_m
    blocks_spanned = jnp.where(stops > starts, (stops - 1) // block_m - first_block + 1, 0)
    visits_before = jnp.cumsum(blocks_spanned)
    num_visits = visits_before[-1]
    visit = jnp.minimum(jnp.arange(row_blocks + num_adapters, dtype=jnp.int32), num_visits - 1)
    visit_groups = jnp.searchsorted(visits_before, visit, side="right").astype(jnp.int32)
    first_visit = visits_before[visit_groups] - blocks_spanned[visit_groups]
    visit_blocks = first_block[visit_groups] + visit - first_visit
    return offsets, visit_groups, visit_blocks.astype(jnp.int32), num_visits


@functools.partial(jax.jit, static_argnames=("interpret", "target", "block_m", "block_k",
                                             "block_n"))
def grouped_lora(x, group_sizes, a, b, scales, *, interpret=None, target=None, block_m=None,
                 block_k=None, block_n=None):
    """Prefill-style (SGMV) multi-LoRA delta: `grouped_lora_reference` as Pallas kernels.

    x [M, K] with rows sorted into contiguous groups (see `sort_by_adapter`),
    group_sizes [G] int32 (group g's rows follow group g-1's; rows from sum(group_sizes)
    on get a zero delta, groups are cut at row M), a [G, K, r], b [G, r, N], scales [G]
    -> [M, N] in x.dtype. interpret, target: as in `gathered_lora`. block_m: rows per
    block (TPU: multiple of 8, default 128; GPU: power of 2 >= 16, default 64). block_k,
    block_n: the shrink's K step and the expand's N tile (TPU: reduced to a multiple of
    128 dividing K / N, or all of it, default 512; GPU: powers of 2 >= 16, defaults 64
    and 128).
    """
    m = x.shape[0]
    if m == 0:
        return jnp.zeros((0, b.shape[2]), x.dtype)
    interpret = compat.interpret_default() if interpret is None else interpret
    target = _resolve_target(target)
    if target == "gpu":
        block_m = _check_gpu_tile("block_m", block_m or 64)
    else:
        block_m = _check_tpu_rows(block_m or 128)
    tables = _group_visits(group_sizes, m, block_m)
    if target == "gpu":
        return _grouped_gpu(x, tables, a, b, scales, interpret=interpret, block_m=block_m,
                            block_k=_check_gpu_tile("block_k", block_k or 64),
                            block_n=_check_gpu_tile("block_n", block_n or 128))
    return _grouped_tpu(x, tables, a, b, scales, interpret=interpret, block_m=block_m,
                        block_k=tpu_tile(x.shape[1], block_k or 512),
                        block_n=tpu_tile(b.shape[2], block_n or 512))


def _visit_state(offsets_ref, groups_ref, blocks_ref, visit, num_adapters, block_m, shape):
    """(group, is an adapter, rows of this visit's group in the block [shape], first
    visit of the block) for a TPU visit."""
    group, block = groups_ref[visit], blocks_ref[visit]
    rows = block * block_m + lax.broadcasted_iota(jnp.int32, shape, 0)
    in_group = (rows >= offsets_ref[group]) & (rows < offsets_ref[group + 1])
    first = (visit == 0) | (block != blocks_ref[jnp.maximum(visit - 1, 0)])
    return group, group < num_adapters, in_group, first


def _grouped_tpu(x, tables, a, b, scales, *, interpret, block_m, block_k, block_n):
    offsets, visit_groups, visit_blocks, num_visits = tables
    m, k = x.shape
    num_adapters, _, rank = a.shape
    n = b.shape[2]
    k_steps, n_tiles = k // block_k, n // block_n
    # Real TPUs run exactly the active visits; the interpreter has no dynamic grids.
    visits = visit_blocks.shape[0] if interpret else num_visits
    scales = scales.astype(_F32).reshape(num_adapters, 1, 1)

    def adapter(visit, groups_ref):
        return jnp.minimum(groups_ref[visit], num_adapters - 1)

    def shrink_kernel(offsets_ref, groups_ref, blocks_ref, x_ref, a_ref, scale_ref, s_ref,
                      acc_ref):
        visit, step = pl.program_id(0), pl.program_id(1)
        group, is_adapter, in_group, first = _visit_state(
            offsets_ref, groups_ref, blocks_ref, visit, num_adapters, block_m, acc_ref.shape)

        @pl.when(step == 0)
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(is_adapter)
        def _():
            acc_ref[...] += jnp.dot(x_ref[...], a_ref[...].astype(x_ref.dtype),
                                    preferred_element_type=_F32)

        # Scalar conditions stay in pl.when rather than in vector selects.
        @pl.when((step == k_steps - 1) & first)
        def _():
            s_ref[...] = jnp.zeros_like(s_ref)

        @pl.when((step == k_steps - 1) & is_adapter)
        def _():
            s = (acc_ref[...] * scale_ref[...]).astype(s_ref.dtype)
            s_ref[...] = jnp.where(in_group, s, s_ref[...])

    s = pl.pallas_call(
        shrink_kernel,
        out_shape=jax.ShapeDtypeStruct((m, rank), x.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(visits, k_steps),
            in_specs=[
                pl.BlockSpec((block_m, block_k), lambda v, s, o, g, blk: (blk[v], s)),
                pl.BlockSpec((None, block_k, rank), lambda v, s, o, g, blk: (adapter(v, g), s, 0)),
                pl.BlockSpec((None, 1, 1), lambda v, s, o, g, blk: (adapter(v, g), 0, 0)),
            ],
            out_specs=pl.BlockSpec((block_m, rank), lambda v, s, o, g, blk: (blk[v], 0)),
            scratch_shapes=[pltpu.VMEM((block_m, rank), _F32)],
        ),
        # Both axes carry state: the accumulator over K, the resident output block
        # over the consecutive visits of a row block.
        compiler_params=compat.compiler_params(
            "tpu", dimension_semantics=("arbitrary", "arbitrary")),
        cost_estimate=pl.CostEstimate(
            flops=2 * m * k * rank, transcendentals=0,
            bytes_accessed=x.dtype.itemsize * (m * k + m * rank) + a.dtype.itemsize * a.size),
        interpret=interpret,
    )(offsets, visit_groups, visit_blocks, x, a, scales)

    def expand_kernel(offsets_ref, groups_ref, blocks_ref, s_ref, b_ref, o_ref):
        visit = pl.program_id(1)
        _, is_adapter, in_group, first = _visit_state(
            offsets_ref, groups_ref, blocks_ref, visit, num_adapters, block_m, o_ref.shape)

        @pl.when(first)  # the remainder's rows keep these zeros
        def _():
            o_ref[...] = jnp.zeros_like(o_ref)

        @pl.when(is_adapter)
        def _():
            delta = jnp.dot(s_ref[...], b_ref[...].astype(s_ref.dtype),
                            preferred_element_type=_F32)
            o_ref[...] = jnp.where(in_group, delta.astype(o_ref.dtype), o_ref[...])

    return pl.pallas_call(
        expand_kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(n_tiles, visits),
            in_specs=[
                pl.BlockSpec((block_m, rank), lambda j, v, o, g, blk: (blk[v], 0)),
                pl.BlockSpec((None, rank, block_n), lambda j, v, o, g, blk: (adapter(v, g), 0, j)),
            ],
            out_specs=pl.BlockSpec((block_m, block_n), lambda j, v, o, g, blk: (blk[v], j)),
        ),
        compiler_params=compat.compiler_params(
            "tpu", dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(
            flops=2 * m * rank * n, transcendentals=0,
            bytes_accessed=x.dtype.itemsize * (m * rank + m * n) + b.dtype.itemsize * b.size),
        interpret=interpret,
    )(offsets, visit_groups, visit_blocks, s, b)


def _grouped_gpu(x, tables, a, b, scales, *, interpret, block_m, block_k, block_n):
    offsets, visit_groups, visit_blocks, num_visits = tables
    m, k = x.shape
    num_adapters, _, rank = a.shape
    n = b.shape[2]
    rank_tile = _rank_tile(rank, TRITON_MIN_DOT)
    visits = visit_blocks.shape[0]
    compute_dtype = x.dtype
    params = compat.compiler_params("gpu", num_warps=4, num_stages=2)

    def visit_state(num_ref, offsets_ref, groups_ref, blocks_ref):
        """(group, first row of the block, rows of the group in the block [block_m],
        whether this is a real visit of an adapter group, of the remainder)."""
        visit = pl.program_id(0)
        group, block = groups_ref[visit], blocks_ref[visit]
        row0 = block * block_m
        rows = row0 + jnp.arange(block_m)
        in_group = (rows >= offsets_ref[group]) & (rows < offsets_ref[group + 1])
        real = visit < num_ref[0]
        return group, row0, in_group, real & (group < num_adapters), real & (
            group >= num_adapters)

    def shrink_kernel(num_ref, offsets_ref, groups_ref, blocks_ref, scales_ref, x_ref, a_ref,
                      s_ref):
        group, row0, in_group, adapter_visit, _ = visit_state(
            num_ref, offsets_ref, groups_ref, blocks_ref)
        in_rank = jnp.arange(rank_tile) < rank

        # Remainder rows are never read back: the expand writes them as zeros.
        @pl.when(adapter_visit)
        def _():
            def step(i, acc):
                in_k = i * block_k + jnp.arange(block_k) < k
                x_tile = pltriton.load(
                    x_ref.at[pl.ds(row0, block_m), pl.ds(i * block_k, block_k)],
                    mask=in_group[:, None] & in_k[None, :], other=0)
                a_tile = pltriton.load(
                    a_ref.at[group, pl.ds(i * block_k, block_k), pl.ds(0, rank_tile)],
                    mask=in_k[:, None] & in_rank[None, :], other=0)
                return acc + jnp.dot(x_tile, a_tile.astype(compute_dtype),
                                     preferred_element_type=_F32)

            acc = lax.fori_loop(0, pl.cdiv(k, block_k), step,
                                jnp.zeros((block_m, rank_tile), _F32))
            pltriton.store(s_ref.at[pl.ds(row0, block_m), pl.ds(0, rank_tile)],
                           (acc * scales_ref[group]).astype(s_ref.dtype),
                           mask=in_group[:, None] & in_rank[None, :])

    metadata = (num_visits.reshape(1), offsets, visit_groups, visit_blocks)
    s = pl.pallas_call(
        shrink_kernel,
        out_shape=jax.ShapeDtypeStruct((m, rank), x.dtype),
        grid=(visits,),
        compiler_params=params,
        interpret=interpret,
    )(*metadata, scales.astype(_F32), x, a)

    def expand_kernel(num_ref, offsets_ref, groups_ref, blocks_ref, s_ref, b_ref, o_ref):
        group, row0, in_group, adapter_visit, remainder_visit = visit_state(
            num_ref, offsets_ref, groups_ref, blocks_ref)
        in_rank = jnp.arange(rank_tile) < rank
        col0 = pl.program_id(1) * block_n
        in_n = col0 + jnp.arange(block_n) < n
        out = o_ref.at[pl.ds(row0, block_m), pl.ds(col0, block_n)]
        store_mask = in_group[:, None] & in_n[None, :]

        @pl.when(adapter_visit)
        def _():
            s_tile = pltriton.load(s_ref.at[pl.ds(row0, block_m), pl.ds(0, rank_tile)],
                                   mask=in_group[:, None] & in_rank[None, :], other=0)
            b_tile = pltriton.load(b_ref.at[group, pl.ds(0, rank_tile), pl.ds(col0, block_n)],
                                   mask=in_rank[:, None] & in_n[None, :], other=0)
            delta = jnp.dot(s_tile, b_tile.astype(compute_dtype), preferred_element_type=_F32)
            pltriton.store(out, delta.astype(o_ref.dtype), mask=store_mask)

        @pl.when(remainder_visit)
        def _():
            pltriton.store(out, jnp.zeros((block_m, block_n), o_ref.dtype), mask=store_mask)

    return pl.pallas_call(
        expand_kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=(visits, pl.cdiv(n, block_n)),
        compiler_params=params,
        interpret=interpret,
    )(*metadata, s, b)
