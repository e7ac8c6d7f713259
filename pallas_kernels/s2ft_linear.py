"""S2FT partial backprop: a frozen matmul with a trainable dense block beside it.

After S2FT's co-permutation (jft/peft/s2ft.py) the trained units of a weight w [K, N]
are its first C input rows or output columns, trained as a separate dense block:

- input side (o_proj, down_proj): y = x @ w + x[:, :C] @ block, block [C, N];
- output side (q/k/v, gate, up): y = x @ w, then y[:, :C] += x @ block, block [K, C].

x is [..., K] (leading dims are flattened). Both are `jax.custom_vjp`s whose backward
never forms a weight gradient of w (its cotangent is None, a symbolic zero) and whose
residuals are the activations the block's gradient needs: x[:, :C] alone on the input
side (dx needs only dy, w and block), x on the output side (d_block = x.T @ dy[:, :C]).
Numerics follow the references: w and block are used in x's dtype, every product
accumulates in float32, y and dx come out in x's dtype, d_block in block's.

Forward: XLA, the reference expression. It is one dense GEMM plus a thin one; on GPU
XLA hands x @ w to cuBLAS and can fold the add into the thin GEMM as its matrix bias,
on TPU it fuses the add into a GEMM's output, and a Pallas GEMM could at best match
either. The custom_vjp exists for the backward.

Backward, fused (one Pallas kernel per side): dx tiles (M, K) accumulate over N tiles,
the canonical matmul grid, and the block's term rides along where the K tile (input
side) or N tile (output side) overlaps the first C: dx += dy @ block.T, and the block's
gradient for that tile, x_tile.T @ dy_tile, from the dy tile already in VMEM/registers
(output side: with the x tile loaded once per dx tile). The block term is a second
product, not w with the block added to its rows: in bf16 that sum would round the
(small) block away. d_block comes out as one float32 partial per M block, summed by XLA.

Where the fusion pays, and where it does not. It saves the d_block GEMM's own pass over
dy (input side: M*N elements; output side: the pass over x, M*K, and dy[:, :C]), and
it costs writing and re-reading the float32 partials, (M / block_m) * C * N (or K * C)
elements, 4 bytes each, twice. So it pays while 8 * C < itemsize * block_m, e.g.
C < 128 at block_m 512 in bf16 (TPU default), and loses for wider blocks: S2FT's usual
3% of a 14336-channel MLP is C ~ 430. `fuse=None` decides by this rule (on CPU, where
Pallas only interprets, it picks XLA); `fuse=True` or False force it. Either way the
saving is one activation pass beside the dx GEMM's 2*M*N*K flops: at best
(peak flop/s / HBM bytes/s) / K of its time (input side; / N on the output side),
about 7% at K = 4096 on an H100 in bf16 and 2% at K = 14336. And the fused kernel
computes dx with a Pallas GEMM: on TPU that matches XLA, on GPU a Triton GEMM may
trail cuBLAS by more than the saving (untuned, unmeasured here), so the fused path is
only worth it on GPU after benchmarking. The unfused backward is the same math in XLA:
dx = dy @ w.T (+ the block's term), d_block a separate GEMM.

Kernel layouts. TPU (Mosaic): grid (M blocks, K tiles, N tiles), dims (parallel,
arbitrary, arbitrary) on the input side (the K axis must stay on one core: tiles past
the block's rows park the partial's block index on the last one written) and (parallel,
parallel, arbitrary) on the output side; K and N tiles are multiples of 128 dividing the
dims or the whole dims, so they never straddle an edge; rows past M in the last M block
are zeroed before the partial product (dx rows past M are dropped on write). The narrow
operands are padded to whole tiles: x[:, :C] or block to a multiple of the tile over C
(copies of M*C or C*N elements, never of w). GPU (Triton): grid (M blocks, K tiles), a
fori_loop over N tiles, every load and store masked, so nothing is padded; power-of-2
tiles of at least 16 (the Triton dot minimum).

Default blocks (overridable): TPU block_m 512, block_k 512, block_n 512; GPU block_m 64,
block_k 64, block_n 64, num_warps 4, num_stages 2.
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
from jft.pallas_kernels.compat import (
    TPU_SUBLANES,
    TRITON_MIN_DOT,
    pltriton,
    tpu_tile,
)

_F32 = jnp.float32
_DEFAULT_BLOCKS = {"tpu": (512, 512, 512), "gpu": (64, 64, 64)}  # block_m, block_k, block_n
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


# ---------------------------------------------------------------- references


def s2ft_input_side_reference(x, w, block):
    """y = x @ w + x[..., :C] @ block; x [..., K], w [K, N], block [C, N] -> [..., N]."""
    c = block.shape[0]
    y = jnp.dot(x, w.astype(x.dtype), preferred_element_type=_F32)
    y = y + jnp.dot(x[..., :c], block.astype(x.dtype), preferred_element_type=_F32)
    return y.astype(x.dtype)


def s2ft_output_side_reference(x, w, block):
    """y = x @ w, y[..., :C] += x @ block; x [..., K], w [K, N], block [K, C] -> [..., N]."""
    c = block.shape[1]
    y = jnp.dot(x, w.astype(x.dtype), preferred_element_type=_F32)
    y = y.at[..., :c].add(jnp.dot(x, block.astype(x.dtype), preferred_element_type=_F32))
    return y.astype(x.dtype)


# ---------------------------------------------------------------- public kernels


@dataclasses.dataclass(frozen=True)
class _Backward:
    """How the backward runs (hashable: a nondiff argument of the custom_vjp)."""
    fused: bool
    target: str
    interpret: bool | pltpu.InterpretParams
    block_m: int
    block_k: int
    block_n: int


def _plan(x, c, *, interpret, target, block_m, block_k, block_n, fuse):
    target = target or compat.platform()
    target = "tpu" if target == "cpu" else target  # CPU interprets the TPU body
    default_m, default_k, default_n = _DEFAULT_BLOCKS[target]
    block_m, block_k, block_n = block_m or default_m, block_k or default_k, block_n or default_n
    if target == "gpu":
        for name, size in (("block_m", block_m), ("block_k", block_k), ("block_n", block_n)):
            if size < TRITON_MIN_DOT or size & (size - 1):
                raise ValueError(f"GPU {name} must be a power of 2 >= {TRITON_MIN_DOT}, "
                                 f"got {size}")
    elif block_m % TPU_SUBLANES:
        raise ValueError(f"TPU block_m must be a multiple of {TPU_SUBLANES}, got {block_m}")
    if fuse is None:  # the traffic rule of the module docstring, where Pallas compiles
        fuse = compat.pallas_supported() and 8 * c < x.dtype.itemsize * block_m
    interpret = compat.interpret_default() if interpret is None else interpret
    return _Backward(bool(fuse), target, interpret, block_m, block_k, block_n)


_STATIC = ("interpret", "target", "block_m", "block_k", "block_n", "fuse")


@functools.partial(jax.jit, static_argnames=_STATIC)
def s2ft_input_side(x, w, block, *, interpret=None, target=None, block_m=None, block_k=None,
                    block_n=None, fuse=None):
    """`s2ft_input_side_reference` with S2FT's backward: residual x[:, :C], no dW.

    interpret: run the backward kernel in the HLO interpreter (default: on CPU), or a
    `pltpu.InterpretParams` for the TPU simulator. target: 'tpu' or 'gpu' kernel body
    (default: this machine's; CPU interprets the TPU body). block_m, block_k, block_n:
    the backward kernel's tiles of M, K and N (TPU: K and N tiles reduced to multiples
    of 128 dividing the dim, or the whole dim; GPU: powers of 2 >= 16). fuse: the
    Pallas backward (True), the XLA one (False), or by the traffic rule in the module
    docstring (None; XLA on CPU).
    """
    k = x.shape[-1]
    plan = _plan(x, block.shape[0], interpret=interpret, target=target, block_m=block_m,
                 block_k=block_k, block_n=block_n, fuse=fuse)
    y = _input_side(x.reshape(-1, k), w, block, plan)
    return y.reshape(*x.shape[:-1], w.shape[1])


@functools.partial(jax.jit, static_argnames=_STATIC)
def s2ft_output_side(x, w, block, *, interpret=None, target=None, block_m=None, block_k=None,
                     block_n=None, fuse=None):
    """`s2ft_output_side_reference` with S2FT's backward: residual x, no dW. Arguments
    as in `s2ft_input_side`."""
    k = x.shape[-1]
    plan = _plan(x, block.shape[1], interpret=interpret, target=target, block_m=block_m,
                 block_k=block_k, block_n=block_n, fuse=fuse)
    y = _output_side(x.reshape(-1, k), w, block, plan)
    return y.reshape(*x.shape[:-1], w.shape[1])


# ---------------------------------------------------------------- custom_vjp rules


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _input_side(x, w, block, plan):
    return s2ft_input_side_reference(x, w, block)


def _input_side_fwd(x, w, block, plan):
    # w and block are parameters, held by reference; the only activation kept is x[:, :C].
    return s2ft_input_side_reference(x, w, block), (x[:, :block.shape[0]], w, block)


def _input_side_bwd(plan, residuals, dy):
    x_c, w, block = residuals
    block_x = block.astype(dy.dtype)
    if plan.fused:
        dx, partials = _input_side_backward_kernel(dy, w.astype(dy.dtype), block_x, x_c, plan)
        d_block = partials.sum(0)[:block.shape[0]]
    else:
        dx = lax.dot_general(dy, w.astype(dy.dtype), _NT, preferred_element_type=_F32)
        dx = dx.at[:, :block.shape[0]].add(
            lax.dot_general(dy, block_x, _NT, preferred_element_type=_F32))
        d_block = lax.dot_general(x_c, dy, _TN, preferred_element_type=_F32)
    return dx.astype(dy.dtype), None, d_block.astype(block.dtype)


_input_side.defvjp(_input_side_fwd, _input_side_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _output_side(x, w, block, plan):
    return s2ft_output_side_reference(x, w, block)


def _output_side_fwd(x, w, block, plan):
    return s2ft_output_side_reference(x, w, block), (x, w, block)


def _output_side_bwd(plan, residuals, dy):
    x, w, block = residuals
    c = block.shape[1]
    block_x = block.astype(dy.dtype)
    if plan.fused:
        dx, partials = _output_side_backward_kernel(dy, w.astype(dy.dtype), block_x, x, plan)
        d_block = partials.sum(0)[:, :c]
    else:
        dx = lax.dot_general(dy, w.astype(dy.dtype), _NT, preferred_element_type=_F32)
        dx = dx + lax.dot_general(dy[:, :c], block_x, _NT, preferred_element_type=_F32)
        d_block = lax.dot_general(x, dy[:, :c], _TN, preferred_element_type=_F32)
    return dx.astype(dy.dtype), None, d_block.astype(block.dtype)


_output_side.defvjp(_output_side_fwd, _output_side_bwd)


# ---------------------------------------------------------------- shared helpers



def _rows_zeroed(value, first_row, m):
    """`value` [rows, ...] with the rows at and past M zeroed (select in f32: the VPU of
    older TPUs has no bf16), back in its dtype."""
    rows = first_row + lax.broadcasted_iota(jnp.int32, value.shape, 0)
    return jnp.where(rows < m, value.astype(_F32), 0.0).astype(value.dtype)


def _transposed_product(a, b):
    """a.T @ b in f32, transposing in f32 first (megablox's tgmm pattern on TPU)."""
    return jnp.dot(a.astype(_F32).T.astype(a.dtype), b, preferred_element_type=_F32)


def _cost(m, k, n, c, dtype):
    return pl.CostEstimate(flops=2 * m * n * (k + 2 * c), transcendentals=0,
                           bytes_accessed=dtype.itemsize * (m * n + k * n + m * k + c * n))


# ---------------------------------------------------------------- input side kernels


def _input_side_backward_kernel(dy, w, block, x_c, plan):
    """(dx [M, K] f32-accumulated in dy.dtype, partials [M blocks, >= C, N] f32)."""
    if plan.target == "gpu":
        return _input_side_gpu(dy, w, block, x_c, plan)
    return _input_side_tpu(dy, w, block, x_c, plan)


def _input_side_tpu(dy, w, block, x_c, plan):
    m, n = dy.shape
    k, c = w.shape[0], block.shape[0]
    block_m = plan.block_m
    block_k, block_n = tpu_tile(k, plan.block_k), tpu_tile(n, plan.block_n)
    m_blocks, k_tiles, n_tiles = pl.cdiv(m, block_m), k // block_k, n // block_n
    block_tiles = pl.cdiv(c, block_k)  # the K tiles holding the block's rows
    padded_c = block_tiles * block_k
    x_c = jnp.pad(x_c, ((0, 0), (0, padded_c - c)))
    block = jnp.pad(block, ((0, padded_c - c), (0, 0)))
    last = (block_tiles - 1, n_tiles - 1)

    def block_index(i, j, l):
        # K tiles past the block's rows stay on its last tile: no refetch, and the
        # partial's block (written there last) is kept rather than written back stale.
        return jnp.where(j < block_tiles, j, last[0]), jnp.where(j < block_tiles, l, last[1])

    def kernel(dy_ref, w_ref, block_ref, x_c_ref, dx_ref, partial_ref, acc_ref):
        i, j, l = pl.program_id(0), pl.program_id(1), pl.program_id(2)

        @pl.when(l == 0)
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        dy_tile = dy_ref[...]
        acc_ref[...] += lax.dot_general(dy_tile, w_ref[...], _NT, preferred_element_type=_F32)

        @pl.when(j < block_tiles)
        def _():
            acc_ref[...] += lax.dot_general(dy_tile, block_ref[...], _NT,
                                            preferred_element_type=_F32)
            partial_ref[...] = _transposed_product(
                _rows_zeroed(x_c_ref[...], i * block_m, m),
                _rows_zeroed(dy_tile, i * block_m, m))

        @pl.when(l == n_tiles - 1)
        def _():
            dx_ref[...] = acc_ref[...].astype(dx_ref.dtype)

    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((m, k), dy.dtype),
                   jax.ShapeDtypeStruct((m_blocks, padded_c, n), _F32)),
        grid=(m_blocks, k_tiles, n_tiles),
        in_specs=[
            pl.BlockSpec((block_m, block_n), lambda i, j, l: (i, l)),
            pl.BlockSpec((block_k, block_n), lambda i, j, l: (j, l)),
            pl.BlockSpec((block_k, block_n), lambda i, j, l: block_index(i, j, l)),
            pl.BlockSpec((block_m, block_k), lambda i, j, l: (i, block_index(i, j, l)[0])),
        ],
        out_specs=[
            pl.BlockSpec((block_m, block_k), lambda i, j, l: (i, j)),
            pl.BlockSpec((None, block_k, block_n), lambda i, j, l: (i, *block_index(i, j, l))),
        ],
        scratch_shapes=[pltpu.VMEM((block_m, block_k), _F32)],
        compiler_params=compat.compiler_params(
            "tpu", dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        cost_estimate=_cost(m, k, n, c, dy.dtype),
        interpret=plan.interpret,
    )(dy, w, block, x_c)


def _input_side_gpu(dy, w, block, x_c, plan):
    m, n = dy.shape
    k, c = w.shape[0], block.shape[0]
    block_m, block_k, block_n = plan.block_m, plan.block_k, plan.block_n
    m_blocks, n_tiles = pl.cdiv(m, block_m), pl.cdiv(n, block_n)

    def kernel(dy_ref, w_ref, block_ref, x_c_ref, dx_ref, partial_ref):
        i, j = pl.program_id(0), pl.program_id(1)
        row0, k0 = i * block_m, j * block_k
        in_m = row0 + jnp.arange(block_m) < m
        in_k = k0 + jnp.arange(block_k) < k
        in_c = k0 + jnp.arange(block_k) < c

        def dy_w_tiles(l):
            in_n = l * block_n + jnp.arange(block_n) < n
            columns = pl.ds(l * block_n, block_n)
            dy_tile = pltriton.load(dy_ref.at[pl.ds(row0, block_m), columns],
                                    mask=in_m[:, None] & in_n[None, :], other=0)
            w_tile = pltriton.load(w_ref.at[pl.ds(k0, block_k), columns],
                                   mask=in_k[:, None] & in_n[None, :], other=0)
            return dy_tile, w_tile, in_n, columns

        def frozen_step(l, acc):
            dy_tile, w_tile, _, _ = dy_w_tiles(l)
            return acc + lax.dot_general(dy_tile, w_tile, _NT, preferred_element_type=_F32)

        def block_step(l, acc, x_c_tile):
            dy_tile, w_tile, in_n, columns = dy_w_tiles(l)
            block_tile = pltriton.load(block_ref.at[pl.ds(k0, block_k), columns],
                                       mask=in_c[:, None] & in_n[None, :], other=0)
            pltriton.store(partial_ref.at[i, pl.ds(k0, block_k), columns],
                           lax.dot_general(x_c_tile, dy_tile, _TN, preferred_element_type=_F32),
                           mask=in_c[:, None] & in_n[None, :])
            acc = acc + lax.dot_general(dy_tile, w_tile, _NT, preferred_element_type=_F32)
            return acc + lax.dot_general(dy_tile, block_tile, _NT, preferred_element_type=_F32)

        def store_dx(acc):
            pltriton.store(dx_ref.at[pl.ds(row0, block_m), pl.ds(k0, block_k)],
                           acc.astype(dx_ref.dtype), mask=in_m[:, None] & in_k[None, :])

        zeros = jnp.zeros((block_m, block_k), _F32)

        @pl.when(k0 < c)
        def _():
            x_c_tile = pltriton.load(x_c_ref.at[pl.ds(row0, block_m), pl.ds(k0, block_k)],
                                     mask=in_m[:, None] & in_c[None, :], other=0)
            store_dx(lax.fori_loop(0, n_tiles, functools.partial(block_step, x_c_tile=x_c_tile),
                                   zeros))

        @pl.when(k0 >= c)
        def _():
            store_dx(lax.fori_loop(0, n_tiles, frozen_step, zeros))

    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((m, k), dy.dtype),
                   jax.ShapeDtypeStruct((m_blocks, c, n), _F32)),
        grid=(m_blocks, pl.cdiv(k, block_k)),
        compiler_params=compat.compiler_params("gpu", num_warps=4, num_stages=2),
        interpret=plan.interpret,
    )(dy, w, block, x_c)


# ---------------------------------------------------------------- output side kernels


def _output_side_backward_kernel(dy, w, block, x, plan):
    """(dx [M, K] in dy.dtype, partials [M blocks, K, >= C] f32)."""
    if plan.target == "gpu":
        return _output_side_gpu(dy, w, block, x, plan)
    return _output_side_tpu(dy, w, block, x, plan)


def _output_side_tpu(dy, w, block, x, plan):
    m, n = dy.shape
    k, c = block.shape
    block_m = plan.block_m
    block_k, block_n = tpu_tile(k, plan.block_k), tpu_tile(n, plan.block_n)
    m_blocks, k_tiles, n_tiles = pl.cdiv(m, block_m), k // block_k, n // block_n
    block_tiles = pl.cdiv(c, block_n)  # the N tiles holding the block's columns
    padded_c = block_tiles * block_n
    block = jnp.pad(block, ((0, 0), (0, padded_c - c)))

    def kernel(dy_ref, w_ref, block_ref, x_ref, dx_ref, partial_ref, acc_ref):
        i, l = pl.program_id(0), pl.program_id(2)

        @pl.when(l == 0)
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        dy_tile = dy_ref[...]
        acc_ref[...] += lax.dot_general(dy_tile, w_ref[...], _NT, preferred_element_type=_F32)

        @pl.when(l < block_tiles)
        def _():
            # block's padded columns are zero, so dy's columns past C add nothing here.
            acc_ref[...] += lax.dot_general(dy_tile, block_ref[...], _NT,
                                            preferred_element_type=_F32)
            partial_ref[...] = _transposed_product(_rows_zeroed(x_ref[...], i * block_m, m),
                                                   _rows_zeroed(dy_tile, i * block_m, m))

        @pl.when(l == n_tiles - 1)
        def _():
            dx_ref[...] = acc_ref[...].astype(dx_ref.dtype)

    # N tiles past the block's columns stay on its last tile: no refetch, and the
    # partial's block (written there last) is kept rather than written back stale.
    def block_tile(l):
        return jnp.minimum(l, block_tiles - 1)

    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((m, k), dy.dtype),
                   jax.ShapeDtypeStruct((m_blocks, k, padded_c), _F32)),
        grid=(m_blocks, k_tiles, n_tiles),
        in_specs=[
            pl.BlockSpec((block_m, block_n), lambda i, j, l: (i, l)),
            pl.BlockSpec((block_k, block_n), lambda i, j, l: (j, l)),
            pl.BlockSpec((block_k, block_n), lambda i, j, l: (j, block_tile(l))),
            pl.BlockSpec((block_m, block_k), lambda i, j, l: (i, j)),
        ],
        out_specs=[
            pl.BlockSpec((block_m, block_k), lambda i, j, l: (i, j)),
            pl.BlockSpec((None, block_k, block_n), lambda i, j, l: (i, j, block_tile(l))),
        ],
        scratch_shapes=[pltpu.VMEM((block_m, block_k), _F32)],
        compiler_params=compat.compiler_params(
            "tpu", dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(m, k, n, c, dy.dtype),
        interpret=plan.interpret,
    )(dy, w, block, x)


def _output_side_gpu(dy, w, block, x, plan):
    m, n = dy.shape
    k, c = block.shape
    block_m, block_k, block_n = plan.block_m, plan.block_k, plan.block_n
    m_blocks, n_tiles = pl.cdiv(m, block_m), pl.cdiv(n, block_n)
    block_tiles = pl.cdiv(c, block_n)

    def kernel(dy_ref, w_ref, block_ref, x_ref, dx_ref, partial_ref):
        i, j = pl.program_id(0), pl.program_id(1)
        row0, k0 = i * block_m, j * block_k
        in_m = row0 + jnp.arange(block_m) < m
        in_k = k0 + jnp.arange(block_k) < k

        def dy_w_tiles(l):
            in_n = l * block_n + jnp.arange(block_n) < n
            columns = pl.ds(l * block_n, block_n)
            dy_tile = pltriton.load(dy_ref.at[pl.ds(row0, block_m), columns],
                                    mask=in_m[:, None] & in_n[None, :], other=0)
            w_tile = pltriton.load(w_ref.at[pl.ds(k0, block_k), columns],
                                   mask=in_k[:, None] & in_n[None, :], other=0)
            return dy_tile, w_tile, columns

        x_tile = pltriton.load(x_ref.at[pl.ds(row0, block_m), pl.ds(k0, block_k)],
                               mask=in_m[:, None] & in_k[None, :], other=0)

        def block_step(l, acc):
            dy_tile, w_tile, columns = dy_w_tiles(l)
            in_c = l * block_n + jnp.arange(block_n) < c
            # Masked past C, the block tile also drops dy's columns past C.
            block_tile = pltriton.load(block_ref.at[pl.ds(k0, block_k), columns],
                                       mask=in_k[:, None] & in_c[None, :], other=0)
            pltriton.store(partial_ref.at[i, pl.ds(k0, block_k), columns],
                           lax.dot_general(x_tile, dy_tile, _TN, preferred_element_type=_F32),
                           mask=in_k[:, None] & in_c[None, :])
            acc = acc + lax.dot_general(dy_tile, w_tile, _NT, preferred_element_type=_F32)
            return acc + lax.dot_general(dy_tile, block_tile, _NT, preferred_element_type=_F32)

        def frozen_step(l, acc):
            dy_tile, w_tile, _ = dy_w_tiles(l)
            return acc + lax.dot_general(dy_tile, w_tile, _NT, preferred_element_type=_F32)

        acc = lax.fori_loop(0, block_tiles, block_step, jnp.zeros((block_m, block_k), _F32))
        acc = lax.fori_loop(block_tiles, n_tiles, frozen_step, acc)
        pltriton.store(dx_ref.at[pl.ds(row0, block_m), pl.ds(k0, block_k)],
                       acc.astype(dx_ref.dtype), mask=in_m[:, None] & in_k[None, :])

    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((m, k), dy.dtype),
                   jax.ShapeDtypeStruct((m_blocks, k, c), _F32)),
        grid=(m_blocks, pl.cdiv(k, block_k)),
        compiler_params=compat.compiler_params("gpu", num_warps=4, num_stages=2),
        interpret=plan.interpret,
    )(dy, w, block, x)
