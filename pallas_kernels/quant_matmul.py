"""Fused dequantize-and-matmul for frozen block-quantized weights (QLoRA's base linears).

y = x @ W^T, W [N, K] a `QuantizedTensor` quantized in blocks along K (its last axis,
the contracted one: the [out, in] layout of jft/quant/params.py). The XLA path,
`quant_matmul_reference`, dequantizes the whole of W into x's dtype and hands it to a
GEMM; `quant_matmul` instead reads W's codes and scales tile by tile and dequantizes
each tile in registers just before its dot, so the float W is never written to memory.

Formats (jft/quant/formats.py), per element of a tile, computed in float32 exactly as
the reference computes them, then cast to x's dtype as the reference does:

- nf4, fp4: two codes per byte, the even element in the high nibble; a code indexes a
  16-entry codebook, looked up by a tree of 15 selects on its four bits (a gather does
  not lower in Pallas, and the tree is half the work of 16 compare-and-selects);
  value = code value * absmax.
- int8: q * (absmax / 127).
- q8_0: q * d, d float16.
- q4_0: per 32-element block, 16 bytes: elements 0..15 in the low nibbles, 16..31 in
  the high ones; value = (q - 8) * d.

Double quantization's scales (one uint8 per block plus a few floats) are dequantized
by XLA before the call (`dequantize_scales`): they are 1/64 of W's elements or fewer,
and the kernel then sees float scales for every format.

Kernels (Triton's layout: each program owns one output tile and loops over the
contraction with a float32 accumulator in registers):

- forward: grid (M / block_m, N / block_n); a program walks K in tiles of block_k,
  loading x [block_m, block_k] and W's codes [block_n, block_k * bits / 8] and scales,
  dequantizing the [block_n, block_k] tile and accumulating x @ tile^T.
- backward: W is frozen, so only dx = dy @ W [M, K] is computed (no weight gradient:
  the codes' and scales' cotangents are None, symbolic zeros; for the integer codes JAX
  turns that into float0). The same tile dequantization, now with a grid (M / block_m,
  K / block_k) and a loop over N in tiles of block_n: dx tile += dy tile @ W tile. The
  residuals are W's codes and scales, which are params (kept by reference), not x.

block_k is a power of 2 of at least 32 (a q4_0 block; 16 bytes of 4-bit codes) dividing
K, so it is a multiple of the quantization block or a divisor of it (both are powers of
2): a tile then covers whole scale blocks, or lies inside one. K is never padded, since
the codes would have to be; a weight whose columns do not fill whole blocks (a ragged
last block, possible in nf4/fp4/int8) takes the reference. M and N are padded with zeros
in the wrapper (zero scales make padded rows of W zero) and the result sliced; blocks
prefer divisors of the dims, so Llama-sized N never copies W.

Platforms: GPU (Triton, with Triton's compiler params passed explicitly: from JAX 0.9 a
GPU `pallas_call` without them goes to Mosaic GPU) and CPU in interpret mode, which runs
the same kernel bodies (tests). There is no TPU body (Mosaic wants 128-lane-aligned
tiles and would need a K grid axis with a VMEM accumulator); on TPU use `kernels: xla`.

Default blocks (block_m, block_n, block_k), untuned: (128, 128, 64) for 16-bit inputs,
(64, 64, 32) for float32. Triton needs power-of-2 tiles of at least 16 (its dot minimum).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from jft.pallas_kernels import compat
from jft.pallas_kernels.compat import TRITON_MIN_DOT
from jft.quant.formats import FORMATS
from jft.quant.tensor import QuantizedTensor, dequantize, dequantize_scales

_DEFAULT_BLOCKS = {2: (128, 128, 64), 4: (64, 64, 32)}  # by x's itemsize: 16-bit, 32-bit
# A K tile holds whole q4_0 blocks (32 elements) and at least 16 bytes of 4-bit codes.
_MIN_BLOCK_K = 32
_F32 = jnp.float32


def quant_matmul_reference(x, weight: QuantizedTensor, out_dtype=None):
    """XLA reference: x [..., K] @ dequantize(weight, x.dtype)^T, weight the matrix [N, K]
    -> [..., N] in out_dtype (default x.dtype), accumulated in float32. Plain jnp,
    differentiable by autodiff."""
    _check_operands(x, weight)
    w = dequantize(weight, x.dtype)  # [N, K]
    y = lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())),
                        preferred_element_type=_F32)
    return y.astype(out_dtype or x.dtype)


def quant_matmul(x, weight: QuantizedTensor, out_dtype=None, *, interpret=None,
                 block_m=None, block_n=None, block_k=None):
    """Same function, the Pallas kernels under a jax.custom_vjp. interpret=None means
    compat.interpret_default(). x gets its gradient (in x.dtype); the weight gets none
    (zero cotangents). Blocks default by x's dtype (module docstring); block_k is
    rounded to a power of 2 of at least 32 that divides K."""
    return _quant_matmul(x, weight, out_dtype, target=compat.platform(), interpret=interpret,
                         block_m=block_m, block_n=block_n, block_k=block_k)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static choices of one call: the weight's format, dtypes, blocks, interpret mode."""

    format: str
    block: int  # elements per scale
    x_dtype: np.dtype
    out_dtype: np.dtype
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


def _quant_matmul(x, weight, out_dtype=None, *, target, interpret=None, block_m=None,
                  block_n=None, block_k=None):
    """quant_matmul lowered for an explicit target ('gpu', or 'cpu' to interpret)."""
    _check_operands(x, weight)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if weight.columns % weight.block:
        # A ragged last block: K cannot be tiled in whole blocks without copying codes.
        return quant_matmul_reference(x, weight, out_dtype)
    if interpret is None:
        interpret = compat.interpret_default()
    if target == "tpu" and not interpret:
        raise NotImplementedError("quant_matmul has no TPU kernel body; use kernels: xla")
    scales = weight.scales
    if weight.double_quantized:
        scales = dequantize_scales(scales, weight.scale_absmax, weight.scale_offset)
    plan = _Plan(weight.format, weight.block, jnp.dtype(x.dtype), out_dtype, bool(interpret),
                 block_m, block_n, block_k)
    y = _fused(x.reshape(-1, x.shape[-1]), weight.codes, scales, plan)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _check_operands(x, weight):
    if not isinstance(weight, QuantizedTensor) or weight.ndim != 2:
        raise ValueError("quant_matmul's weight is a 2-D QuantizedTensor [N, K]; slice a "
                         "stacked weight to one layer first")
    if x.shape[-1] != weight.columns:
        raise ValueError(f"x's last axis has {x.shape[-1]} elements; the weight's "
                         f"contracted axis has {weight.columns}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(x, codes, scales, plan):
    return _forward(x, codes, scales, plan)


def _fused_fwd(x, codes, scales, plan):
    return _forward(x, codes, scales, plan), (codes, scales)


def _fused_bwd(plan, residuals, dy):
    codes, scales = residuals
    return _backward(dy.astype(plan.x_dtype), codes, scales, plan), None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


# --- tiling -------------------------------------------------------------------------------


def _tiles(plan, m, n, k) -> _Tiles:
    default_m, default_n, default_k = _DEFAULT_BLOCKS[2 if plan.x_dtype.itemsize <= 2 else 4]
    block_m, padded_m = _fit_block(m, plan.block_m or default_m)
    block_n, padded_n = _fit_block(n, plan.block_n or default_n)
    # K is a multiple of the (power-of-2, >= 32) quantization block, so its largest
    # power-of-2 divisor, k & -k, is at least 32 too.
    block_k = min(_floor_power_of_2(max(_MIN_BLOCK_K, plan.block_k or default_k)), k & -k)
    return _Tiles(block_m, block_n, block_k, padded_m, padded_n)


def _fit_block(dim, preferred):
    """(block, padded dim): a power of 2 of at least 16 (Triton's tensor sizes and tl.dot's
    smallest tile). A smaller block dividing the dim is preferred over padding (which
    copies the array) down to a quarter of the preferred size."""
    preferred = _floor_power_of_2(max(TRITON_MIN_DOT, preferred))
    if dim <= preferred:
        block = max(TRITON_MIN_DOT, 1 << (dim - 1).bit_length())
        return block, block
    for block in (preferred, preferred // 2, preferred // 4):
        if block >= TRITON_MIN_DOT and dim % block == 0:
            return block, dim
    return preferred, -(-dim // preferred) * preferred


def _floor_power_of_2(value):
    return 1 << (value.bit_length() - 1)


def _pad(array, rows, cols=None):
    """Zero-pads a 2-D array to [rows, cols] (cols: as it is); an aligned array passes
    through uncopied."""
    cols = array.shape[1] if cols is None else cols
    if array.shape == (rows, cols):
        return array
    return jnp.pad(array, ((0, rows - array.shape[0]), (0, cols - array.shape[1])))


def _code_bytes(plan, elements):
    """Bytes (code array columns) holding `elements` consecutive codes of a row."""
    return elements * FORMATS[plan.format].bits // 8


def _compiler_params(plan, tiles_out):
    if plan.interpret:
        return None  # interpret mode needs none, and a jaxlib may lack Triton's
    # Eight warps for 128 x 128 tiles and up, the usual Triton choice on Hopper.
    return compat.compiler_params("gpu", num_warps=8 if tiles_out >= 128 * 128 else 4,
                                  num_stages=2)


# --- forward: y = x @ W^T, a loop over K tiles ---------------------------------------------


def _forward(x, codes, scales, plan):
    m, k = x.shape
    n = codes.shape[0]
    tiles = _tiles(plan, m, n, k)
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    x = _pad(x, tiles.m)
    codes, scales = _pad(codes, tiles.n), _pad(scales, tiles.n)
    grid = (tiles.m // bm, tiles.n // bn)
    kernel = functools.partial(_forward_kernel, plan=plan, block_k=bk)
    cost = pl.CostEstimate(
        flops=2 * tiles.m * tiles.n * k, transcendentals=0,
        bytes_accessed=(x.dtype.itemsize * tiles.m * k * grid[1]
                        + (codes.nbytes + scales.nbytes) * grid[0]
                        + plan.out_dtype.itemsize * tiles.m * tiles.n))
    y = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((tiles.m, tiles.n), plan.out_dtype), grid=grid,
        in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
                  pl.BlockSpec((bn, codes.shape[1]), lambda i, j: (j, 0)),
                  pl.BlockSpec((bn, scales.shape[1]), lambda i, j: (j, 0))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=_compiler_params(plan, bm * bn), interpret=plan.interpret,
        cost_estimate=cost, name="quant_matmul",
    )(x, codes, scales)
    return y[:m, :n]


def _forward_kernel(x_ref, codes_ref, scales_ref, out_ref, *, plan, block_k):
    code_bytes = _code_bytes(plan, block_k)

    def step(index, acc):
        columns = pl.ds(pl.multiple_of(index * block_k, block_k), block_k)
        code_columns = pl.ds(pl.multiple_of(index * code_bytes, code_bytes), code_bytes)
        weight = _dequantize_tile(codes_ref[:, code_columns],
                                  scales_ref[:, _scale_columns(index, block_k, plan.block)],
                                  plan, block_k)
        x = x_ref[:, columns]
        return acc + lax.dot_general(x, weight.astype(x.dtype), (((1,), (1,)), ((), ())),
                                     preferred_element_type=_F32)

    acc = jnp.zeros(out_ref.shape, _F32)
    acc = lax.fori_loop(0, x_ref.shape[1] // block_k, step, acc)
    out_ref[...] = acc.astype(out_ref.dtype)


def _scale_columns(k_index, block_k, block):
    """The scale columns of the `k_index`-th K tile: whole blocks, or the one it lies in."""
    if block_k >= block:
        count = block_k // block
        return pl.ds(pl.multiple_of(k_index * count, count), count)
    return pl.ds(k_index // (block // block_k), 1)


# --- backward: dx = dy @ W, a loop over N tiles --------------------------------------------


def _backward(dy, codes, scales, plan):
    m, n = dy.shape
    k = scales.shape[1] * plan.block
    tiles = _tiles(plan, m, n, k)
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    dy = _pad(dy, tiles.m, tiles.n)
    codes, scales = _pad(codes, tiles.n), _pad(scales, tiles.n)
    if bk >= plan.block:
        scale_spec = pl.BlockSpec((tiles.n, bk // plan.block), lambda i, j: (0, j))
    else:
        tiles_per_block = plan.block // bk
        scale_spec = pl.BlockSpec((tiles.n, 1), lambda i, j: (0, j // tiles_per_block))
    grid = (tiles.m // bm, k // bk)
    kernel = functools.partial(_backward_kernel, plan=plan, block_n=bn)
    cost = pl.CostEstimate(
        flops=2 * tiles.m * tiles.n * k, transcendentals=0,
        bytes_accessed=(dy.dtype.itemsize * (tiles.m * tiles.n * grid[1] + tiles.m * k)
                        + (codes.nbytes + scales.nbytes) * grid[0]))
    dx = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((tiles.m, k), plan.x_dtype), grid=grid,
        in_specs=[pl.BlockSpec((bm, tiles.n), lambda i, j: (i, 0)),
                  pl.BlockSpec((tiles.n, _code_bytes(plan, bk)), lambda i, j: (0, j)),
                  scale_spec],
        out_specs=pl.BlockSpec((bm, bk), lambda i, j: (i, j)),
        compiler_params=_compiler_params(plan, bm * bk), interpret=plan.interpret,
        cost_estimate=cost, name="quant_matmul_dx",
    )(dy, codes, scales)
    return dx[:m]


def _backward_kernel(dy_ref, codes_ref, scales_ref, dx_ref, *, plan, block_n):
    block_k = dx_ref.shape[1]

    def step(index, acc):
        rows = pl.ds(pl.multiple_of(index * block_n, block_n), block_n)
        weight = _dequantize_tile(codes_ref[rows, :], scales_ref[rows, :], plan, block_k)
        dy = dy_ref[:, rows]
        return acc + lax.dot_general(dy, weight.astype(dy.dtype), (((1,), (0,)), ((), ())),
                                     preferred_element_type=_F32)

    acc = jnp.zeros(dx_ref.shape, _F32)
    acc = lax.fori_loop(0, dy_ref.shape[1] // block_n, step, acc)
    dx_ref[...] = acc.astype(dx_ref.dtype)


# --- in-kernel dequantization --------------------------------------------------------------


def _dequantize_tile(codes, scales, plan, width):
    """One tile of W in float32 [rows, width], from its codes [rows, width * bits / 8] and
    scales [rows, width / block] (or [rows, 1] when the tile lies inside one block).

    Only forms every backend lowers: shifts and masks, a two-way stack along the last
    axis (Triton's join), transposes and reshapes that merge trailing axes."""
    rows = codes.shape[0]
    if plan.format in ("nf4", "fp4"):
        codes = codes.astype(jnp.int32)  # uint8 zero-extends
        # Byte j holds elements 2j (high nibble) and 2j + 1 (low nibble).
        indices = jnp.stack([codes >> 4, codes & 0xF], axis=-1).reshape(rows, width)
        values = _lookup(indices, FORMATS[plan.format].code)
    elif plan.format == "q4_0":
        groups = codes.astype(jnp.int32).reshape(rows, width // 32, 16)  # a block's 16 bytes
        # [rows, blocks, 16, 2] -> [rows, blocks, 2, 16]: low nibbles (elements 0..15)
        # before high ones (16..31). Stacking on axis -2 directly would be a concatenate
        # off the last axis, which Triton does not lower.
        nibbles = jnp.swapaxes(jnp.stack([groups & 0xF, groups >> 4], axis=-1), -1, -2)
        values = nibbles.reshape(rows, width).astype(_F32) - 8
    else:  # int8, q8_0: one signed byte per element
        values = codes.astype(_F32)
    scales = scales.astype(_F32)
    if plan.format == "int8":
        scales = scales / 127  # as the reference: q * (absmax / 127)
    if scales.shape[1] > 1:
        blocks = scales.shape[1]
        scales = jnp.broadcast_to(scales[:, :, None], (rows, blocks, width // blocks))
        scales = scales.reshape(rows, width)
    return values * scales


def _lookup(indices, codebook):
    """codebook[indices] for int32 indices in [0, 16), by a binary tree of selects on the
    index's bits, lowest first: 15 selects of float32 literals, no gather."""
    level = [np.float32(value) for value in codebook]
    for bit in range(4):
        high = (indices & (1 << bit)) != 0
        level = [jnp.where(high, level[i + 1], level[i]) for i in range(0, len(level), 2)]
    return level[0]
