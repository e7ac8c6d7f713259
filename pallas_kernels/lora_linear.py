"""Fused LoRA linear, y = x W + scale (x A) B: Pallas kernels under one custom VJP.

Unfused, LoRA adds several skinny, memory-bound passes over activation-sized tensors to
each linear (LoRAFusion's diagnosis; see ../shared/research/pallas.md section 3). This
module splits the graph at the small s = x A, as LoRAFusion does:

- forward: s = x A is an XLA GEMM; `xw_sb` computes x W + (scale s) B in one pass, the
  rank-r term seeding the float32 accumulator before the loop over K, so y is written once;
- backward: `dys_dyb` reads dy once to produce both dS = scale dy B^T [M, r] and
  dB = scale s^T dy [r, N]; dA = x^T dS is an XLA GEMM; dx = dy W^T + dS A^T is `xw_sb`
  again, contracting on W's dim 1 (W^T is never materialised), dS A^T seeding it;
- W is frozen: its cotangent is None, a symbolic zero, so no [K, N] product is ever
  built, and the residuals are x and s alone (W, A and B are params, kept by reference).
  `scale` gets no gradient either.

Every kernel has one body per platform. TPU (Mosaic): every block is copied into VMEM,
whose size bounds it, so the grid walks K as an 'arbitrary' axis into a VMEM float32
accumulator.
GPU (Triton): programs run independently and refs are pointers, so each program takes
its whole K extent and loops over it with `fori_loop`. On CPU, interpret mode runs the
TPU bodies (either body runs there; tests cover both).

`dys_dyb` reduces over both M (for dB) and N (for dS). The TPU body walks N as an
'arbitrary' axis and accumulates dS in its resident output block; GPU programs cannot
share an accumulator, so each covers up to _GPU_SPLIT_COLUMNS columns of dy in chunks
and writes a partial dS. Either way each M block writes a float32 partial dB, and XLA
sums the partials: an extra 2r/block_m of dy's bytes (plus 2r/_GPU_SPLIT_COLUMNS on GPU),
against reading dy twice when unfused. A grid over M alone would leave too few programs
on a GPU; deterministic sums rule out atomics.

Ragged shapes are padded with zeros in the wrapper (zeros add nothing to any product)
and the results sliced; blocks are chosen to divide the dims when they can, so aligned
shapes are never copied. Block rules: TPU, a multiple of 128 or the whole dim (128 also
meets the 8-row sublane rule, so one rule serves every role); GPU, a power of 2 of at
least 16 (Triton's tensor sizes, and tl.dot's smallest tile). The rank is padded to 8
(TPU) or to a power of 2 of at least 16 (GPU).

Default blocks (block_m, block_n, block_k): TPU (512, 512, 512); GPU (128, 128, 64) for
16-bit inputs, (64, 64, 32) for float32. block_m is the rows of every program, block_n
tiles N and block_k tiles K, in whichever role: in the dx GEMM K is the output and N the
contraction, so its tile is block_m x block_k stepping by block_n. dys_dyb takes block_m
rows and chunks dy by block_n.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jft.pallas_kernels import compat
from jft.pallas_kernels.compat import TPU_LANES, TRITON_MIN_DOT

_TPU_BLOCKS = (512, 512, 512)  # (block_m, block_n, block_k)
_GPU_BLOCKS = {2: (128, 128, 64), 4: (64, 64, 32)}  # by itemsize: 16-bit, 32-bit
_TPU_RANK_MULTIPLE = 8
# Columns of dy one GPU dys_dyb program covers: its partial dS costs 2r/_GPU_SPLIT_COLUMNS
# of dy's bytes, and splitting N keeps enough programs in flight when M is small.
_GPU_SPLIT_COLUMNS = 1024


def lora_linear_reference(x, w, a, b, scale):
    """XLA reference: x [..., K], w [K, N], a [K, r], b [r, N], scale a scalar (python float
    or 0-d array, may be traced) -> [..., N] in x.dtype. Plain jnp, differentiable by
    autodiff; products accumulate in float32 and the result is cast once."""
    base = jnp.matmul(x, w, preferred_element_type=jnp.float32)  # [..., N]
    s = jnp.matmul(x, a, preferred_element_type=jnp.float32)  # [..., r]
    low_rank = jnp.matmul(s, b.astype(jnp.float32), preferred_element_type=jnp.float32)
    return (base + scale * low_rank).astype(x.dtype)


def lora_linear(x, w, a, b, scale, *, interpret=None, block_m=None, block_n=None,
                block_k=None):
    """Same function, Pallas kernels under a jax.custom_vjp. interpret=None means
    compat.interpret_default(). Gradients flow to x, a and b (in their dtypes); w and
    scale get none. Blocks default per platform (see the module docstring)."""
    return _lora_linear(x, w, a, b, scale, target=compat.platform(), interpret=interpret,
                        block_m=block_m, block_n=block_n, block_k=block_k)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static choices of one call: which kernel bodies, interpret mode, block overrides."""

    target: str  # 'tpu' or 'gpu'
    interpret: bool
    block_m: int | None
    block_n: int | None
    block_k: int | None


@dataclasses.dataclass(frozen=True)
class _Tiles:
    """Blocks per dim and the padded sizes (multiples of the blocks) the kernels see."""

    block_m: int
    block_n: int
    block_k: int
    m: int
    n: int
    k: int
    r: int


def _lora_linear(x, w, a, b, scale, *, target, interpret=None, block_m=None, block_n=None,
                 block_k=None):
    """lora_linear for an explicit target's kernel bodies ('cpu' runs the TPU ones)."""
    if interpret is None:
        interpret = compat.interpret_default()
    plan = _Plan("gpu" if target == "gpu" else "tpu", bool(interpret), block_m, block_n,
                 block_k)
    # The kernels compute in x's dtype; casting outside the custom VJP lets autodiff
    # return each gradient in its primal's dtype.
    w, a, b = (t.astype(x.dtype) for t in (w, a, b))
    y = _fused(x.reshape(-1, x.shape[-1]), w, a, b, jnp.asarray(scale, jnp.float32), plan)
    return y.reshape(*x.shape[:-1], w.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _fused(x, w, a, b, scale, plan):
    return _forward(x, w, a, b, scale, plan)[0]


def _forward(x, w, a, b, scale, plan):
    m, k = x.shape  # x [M, K]
    n, r = w.shape[1], a.shape[1]
    tiles = _tiles(plan, m, n, k, r, x.dtype)
    s = lax.dot(x, a, preferred_element_type=jnp.float32)  # [M, r]
    # The seed is rounded once from the float32 s, not from the saved x.dtype copy.
    seed = (scale * s).astype(x.dtype)
    y = _xw_sb(_pad(x, tiles.m, tiles.k), _pad(w, tiles.k, tiles.n),
               _pad(seed, tiles.m, tiles.r), _pad(b, tiles.r, tiles.n),
               rhs_transposed=False, block_m=tiles.block_m, block_out=tiles.block_n,
               block_in=tiles.block_k, plan=plan)
    return y[:m, :n], s.astype(x.dtype)


def _fused_fwd(x, w, a, b, scale, plan):
    y, s = _forward(x, w, a, b, scale, plan)
    return y, (x, s, w, a, b, scale)


def _fused_bwd(plan, residuals, dy):
    x, s, w, a, b, scale = residuals  # dy [M, N]
    (m, k), (r, n) = x.shape, b.shape
    tiles = _tiles(plan, m, n, k, r, x.dtype)
    dy = _pad(dy, tiles.m, tiles.n)
    # s^T [r, M] is tiny; handing it over transposed keeps every in-kernel dot a plain
    # or rhs-transposed one, the forms both backends handle natively.
    s_t = _pad(s, tiles.m, tiles.r).T
    if plan.interpret:
        # XLA:CPU would fold this transpose into the interpreted kernel's dot, a bf16 dot
        # its runtime then refuses ("BF16 x BF16 = F32", jaxlib 0.10.2, under jit). A
        # compiled kernel takes its operands materialised anyway.
        s_t = lax.optimization_barrier(s_t)
    ds_partials, db_partials = _dys_dyb(dy, s_t, _pad(b, tiles.r, tiles.n), tiles, plan)
    ds = (scale * ds_partials.sum(0)).astype(x.dtype)  # [Mp, rp]; padding rows/cols are 0
    db = (scale * db_partials.sum(0))[:r, :n].astype(b.dtype)
    da = lax.dot_general(x, ds[:m, :r], (((0,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32).astype(a.dtype)  # [K, r]
    dx = _xw_sb(dy, _pad(w, tiles.k, tiles.n), ds, _pad(a, tiles.k, tiles.r),
                rhs_transposed=True, block_m=tiles.block_m, block_out=tiles.block_k,
                block_in=tiles.block_n, plan=plan)
    return dx[:m, :k], None, da, db, None


_fused.defvjp(_fused_fwd, _fused_bwd)


# --- tiling -------------------------------------------------------------------------------


def _tiles(plan, m, n, k, r, dtype) -> _Tiles:
    if plan.target == "gpu":
        defaults = _GPU_BLOCKS[2 if jnp.dtype(dtype).itemsize <= 2 else 4]
        fit = _gpu_block
        rank = max(TRITON_MIN_DOT, _next_power_of_2(r))
    else:
        defaults, fit = _TPU_BLOCKS, _tpu_block
        rank = _round_up(r, _TPU_RANK_MULTIPLE)
    overrides = (plan.block_m, plan.block_n, plan.block_k)
    (block_m, m), (block_n, n), (block_k, k) = (
        fit(dim, override or default)
        for dim, override, default in zip((m, n, k), overrides, defaults, strict=True))
    return _Tiles(block_m, block_n, block_k, m, n, k, rank)


def _tpu_block(dim, preferred):
    """(block, padded dim) under Mosaic's rule: a multiple of 128, or the whole dim."""
    preferred = max(TPU_LANES, preferred // TPU_LANES * TPU_LANES)
    if dim <= preferred:
        return dim, dim
    padded = _round_up(dim, TPU_LANES)
    block = max(b for b in range(TPU_LANES, preferred + 1, TPU_LANES) if padded % b == 0)
    if dim <= 2 * preferred and (padded != dim or 2 * block < preferred):
        return dim, dim  # one whole-dim block beats a padded copy or small blocks
    return block, padded


def _gpu_block(dim, preferred):
    """(block, padded dim) for Triton: a power of 2 of at least 16. A smaller block that
    divides the dim is preferred over padding (which copies the array) down to a quarter
    of the preferred size."""
    preferred = max(TRITON_MIN_DOT, 1 << (preferred.bit_length() - 1))
    if dim <= preferred:
        block = max(TRITON_MIN_DOT, _next_power_of_2(dim))
        return block, block
    for block in (preferred, preferred // 2, preferred // 4):
        if block >= TRITON_MIN_DOT and dim % block == 0:
            return block, dim
    return preferred, _round_up(dim, preferred)


def _round_up(value, multiple):
    return -(-value // multiple) * multiple


def _next_power_of_2(value):
    return 1 << (value - 1).bit_length()


def _pad(array, rows, cols):
    """Zero-pads a 2-D array to [rows, cols]; aligned arrays pass through uncopied."""
    if array.shape == (rows, cols):
        return array
    return jnp.pad(array, ((0, rows - array.shape[0]), (0, cols - array.shape[1])))


def _contract(lhs, rhs, rhs_transposed):
    """lhs @ rhs (lhs @ rhs^T if rhs_transposed), accumulated in float32."""
    contracting = ((1,), (1,)) if rhs_transposed else ((1,), (0,))
    return lax.dot_general(lhs, rhs, (contracting, ((), ())),
                           preferred_element_type=jnp.float32)


# --- xw_sb: out = lhs @ rhs + seed_lhs @ seed_rhs, the rank-r term seeding the accumulator --


def _xw_sb(lhs, rhs, seed_lhs, seed_rhs, *, rhs_transposed, block_m, block_out, block_in,
           plan):
    """lhs [M, Q] @ rhs + seed_lhs [M, r] @ seed_rhs -> [M, P] in lhs.dtype. rhs is [Q, P]
    and seed_rhs [r, P], or [P, Q] and [P, r] when rhs_transposed (contracting on their
    dim 1). Every dim is a multiple of its block: block_in tiles Q, block_out tiles P."""
    m, q = lhs.shape
    p = rhs.shape[0] if rhs_transposed else rhs.shape[1]
    r = seed_lhs.shape[1]

    def by_out(span, index_map):
        # A block of rhs / seed_rhs: block_out along P, `span` along the other dim.
        shape = (block_out, span) if rhs_transposed else (span, block_out)
        return pl.BlockSpec(shape, index_map)

    def oriented(j, other):
        # The block index of rhs / seed_rhs from the P index j and the other dim's.
        return (j, other) if rhs_transposed else (other, j)

    if plan.target == "tpu":
        grid = (m // block_m, p // block_out, q // block_in)
        in_specs = [
            pl.BlockSpec((block_m, block_in), lambda i, j, kk: (i, kk)),
            by_out(block_in, lambda i, j, kk: oriented(j, kk)),
            pl.BlockSpec((block_m, r), lambda i, j, kk: (i, 0)),
            by_out(r, lambda i, j, kk: oriented(j, 0)),
        ]
        out_spec = pl.BlockSpec((block_m, block_out), lambda i, j, kk: (i, j))
        kernel = functools.partial(_xw_sb_tpu_kernel, rhs_transposed=rhs_transposed)
        scratch = [pltpu.VMEM((block_m, block_out), jnp.float32)]
        params = compat.compiler_params(
            "tpu", dimension_semantics=("parallel", "parallel", "arbitrary"))
    else:
        grid = (m // block_m, p // block_out)
        in_specs = [
            pl.BlockSpec((block_m, q), lambda i, j: (i, 0)),
            by_out(q, lambda i, j: oriented(j, 0)),
            pl.BlockSpec((block_m, r), lambda i, j: (i, 0)),
            by_out(r, lambda i, j: oriented(j, 0)),
        ]
        out_spec = pl.BlockSpec((block_m, block_out), lambda i, j: (i, j))
        kernel = functools.partial(_xw_sb_gpu_kernel, rhs_transposed=rhs_transposed,
                                   block_in=block_in)
        scratch = []
        # Eight warps for 128 x 128 tiles and up, the usual Triton choice on Hopper.
        warps = 8 if block_m * block_out >= 128 * 128 else 4
        params = compat.compiler_params("gpu", num_warps=warps, num_stages=3)

    itemsize = lhs.dtype.itemsize
    cost = pl.CostEstimate(
        flops=2 * m * p * (q + r), transcendentals=0,
        bytes_accessed=itemsize * (m * q * (p // block_out) + p * q * (m // block_m)
                                   + (m + p) * r + m * p))
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((m, p), lhs.dtype), grid=grid,
        in_specs=in_specs, out_specs=out_spec, scratch_shapes=scratch,
        compiler_params=params, interpret=plan.interpret, cost_estimate=cost,
        name="lora_xw_sb",
    )(lhs, rhs, seed_lhs, seed_rhs)


def _xw_sb_tpu_kernel(lhs_ref, rhs_ref, seed_lhs_ref, seed_rhs_ref, out_ref, acc_ref, *,
                      rhs_transposed):
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _seed():
        acc_ref[...] = _contract(seed_lhs_ref[...], seed_rhs_ref[...], rhs_transposed)

    acc_ref[...] += _contract(lhs_ref[...], rhs_ref[...], rhs_transposed)

    @pl.when(step == pl.num_programs(2) - 1)
    def _write():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _xw_sb_gpu_kernel(lhs_ref, rhs_ref, seed_lhs_ref, seed_rhs_ref, out_ref, *,
                      rhs_transposed, block_in):
    def step(index, acc):
        span = pl.ds(pl.multiple_of(index * block_in, block_in), block_in)
        rhs = rhs_ref[:, span] if rhs_transposed else rhs_ref[span, :]
        return acc + _contract(lhs_ref[:, span], rhs, rhs_transposed)

    seed = _contract(seed_lhs_ref[...], seed_rhs_ref[...], rhs_transposed)
    acc = lax.fori_loop(0, lhs_ref.shape[1] // block_in, step, seed)
    out_ref[...] = acc.astype(out_ref.dtype)


# --- dys_dyb: one read of dy for dS = dy B^T and dB = s^T dy ------------------------------


def _dys_dyb(dy, s_t, b, tiles, plan):
    """dy [M, N], s^T [r, M], b [r, N] -> float32 partials (dS [splits, M, r],
    dB [M / block_m, r, N]) whose sums over axis 0 are dy @ b^T and s^T @ dy."""
    m, n = dy.shape
    r = s_t.shape[0]
    block_m, block_n = tiles.block_m, tiles.block_n
    if plan.target == "tpu":
        columns, grid = block_n, (m // block_m, n // block_n)
        kernel = _dys_dyb_tpu_kernel
        # dS accumulates over the N axis in its output block, resident while j moves.
        ds_index = lambda i, j: (0, i, 0)  # noqa: E731
        params = compat.compiler_params("tpu", dimension_semantics=("parallel", "arbitrary"))
    else:
        chunks = n // block_n
        most = max(1, _GPU_SPLIT_COLUMNS // block_n)
        per_program = max(c for c in range(1, most + 1) if chunks % c == 0)
        columns, grid = block_n * per_program, (m // block_m, chunks // per_program)
        kernel = functools.partial(_dys_dyb_gpu_kernel, block_n=block_n)
        ds_index = lambda i, j: (j, i, 0)  # noqa: E731
        params = compat.compiler_params("gpu", num_warps=4, num_stages=3)
    splits = 1 if plan.target == "tpu" else grid[1]
    out_shape = (jax.ShapeDtypeStruct((splits, m, r), jnp.float32),
                 jax.ShapeDtypeStruct((grid[0], r, n), jnp.float32))
    cost = pl.CostEstimate(
        flops=4 * m * n * r, transcendentals=0,
        bytes_accessed=dy.dtype.itemsize * (m * n + r * m * grid[1] + r * n * grid[0])
        + 4 * (splits * m * r + grid[0] * r * n))
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid,
        in_specs=[pl.BlockSpec((block_m, columns), lambda i, j: (i, j)),
                  pl.BlockSpec((r, block_m), lambda i, j: (0, i)),
                  pl.BlockSpec((r, columns), lambda i, j: (0, j))],
        out_specs=(pl.BlockSpec((None, block_m, r), ds_index),
                   pl.BlockSpec((None, r, columns), lambda i, j: (i, 0, j))),
        compiler_params=params, interpret=plan.interpret, cost_estimate=cost,
        name="lora_dys_dyb",
    )(dy, s_t, b)


def _dys_dyb_tpu_kernel(dy_ref, s_t_ref, b_ref, ds_ref, db_ref):
    dy = dy_ref[...]

    @pl.when(pl.program_id(1) == 0)
    def _zero():
        ds_ref[...] = jnp.zeros_like(ds_ref)

    ds_ref[...] += _contract(dy, b_ref[...], rhs_transposed=True)
    db_ref[...] = _contract(s_t_ref[...], dy, rhs_transposed=False)


def _dys_dyb_gpu_kernel(dy_ref, s_t_ref, b_ref, ds_ref, db_ref, *, block_n):
    s_t = s_t_ref[...]

    def step(index, ds):
        span = pl.ds(pl.multiple_of(index * block_n, block_n), block_n)
        dy = dy_ref[:, span]
        db_ref[:, span] = _contract(s_t, dy, rhs_transposed=False)
        return ds + _contract(dy, b_ref[:, span], rhs_transposed=True)

    ds = jnp.zeros(ds_ref.shape, jnp.float32)
    ds_ref[...] = lax.fori_loop(0, dy_ref.shape[1] // block_n, step, ds)
