"""`QuantizedTensor`: an array stored block-quantized along its last axis.

It is a pytree (its arrays are leaves, its format static), so it sits in a params tree
where the float array was: `lax.scan` slices its leading layer axis like any leaf's, jit
and sharding see ordinary arrays, and `dequantize` turns it back into a float array
where it is used.

Double quantization (QLoRA): the float32 block scales of a 4-bit tensor are quantized
again, minus their mean, to the 8-bit dynamic map in blocks of 256, saving about 0.37
bits per parameter. Each of the first `group_ndim` axes (the layers axis of a stacked
weight) gets its own mean and second-level scales, so a layer dequantizes on its own.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jft.quant import codebooks
from jft.quant.formats import BLOCK_SIZES, FORMATS

SCALE_BLOCK = 256  # block size of double quantization's second level


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """codes [..., packed last axis]; scales [..., blocks] (float, or uint8 codes of the
    dynamic map under double quantization, with `scale_absmax` [*groups, scale blocks]
    and `scale_offset` [*groups]). `columns`: the last axis's length."""

    codes: jax.Array
    scales: jax.Array
    scale_absmax: jax.Array | None
    scale_offset: jax.Array | None
    format: str = dataclasses.field(metadata={"static": True})
    block: int = dataclasses.field(metadata={"static": True})
    columns: int = dataclasses.field(metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.codes.shape[:-1], self.columns)

    @property
    def ndim(self) -> int:
        return self.codes.ndim

    @property
    def double_quantized(self) -> bool:
        return self.scale_absmax is not None

    @property
    def nbytes(self) -> int:
        return sum(leaf.nbytes for leaf in jax.tree.leaves(self))

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self, dtype)


def is_quantized(leaf) -> bool:
    return isinstance(leaf, QuantizedTensor)


def quantize(array: np.ndarray, format: str, block: int = 64, double_quant: bool = False,
             group_ndim: int = 0) -> QuantizedTensor:
    """`array` [..., C] quantized along its last axis, in NumPy (host memory).

    A row whose length is not a multiple of `block` ends in a shorter block with its own
    scale, as bitsandbytes' last block. `group_ndim`: leading axes whose entries are
    double-quantized separately (1 for a weight stacked over layers).
    """
    fmt = FORMATS[format]
    if fmt.fixed_block is not None:
        block = fmt.fixed_block
    elif block not in BLOCK_SIZES:
        raise ValueError(f"block size {block}; valid: {', '.join(map(str, BLOCK_SIZES))}")
    array = np.asarray(array, np.float32)
    columns = array.shape[-1]
    count = math.ceil(columns / block)
    if fmt.fixed_block is not None and columns % block:
        raise ValueError(f"{format} needs rows whose length is a multiple of {block}; "
                         f"this one has {columns}")
    padded = np.zeros((*array.shape[:-1], count * block), np.float32)
    padded[..., :columns] = array
    partial = np.zeros(count, bool)
    partial[-1] = columns % block != 0
    codes, scales = fmt.quantize(padded.reshape(*array.shape[:-1], count, block), partial)
    scale_absmax = scale_offset = None
    if double_quant:
        if fmt.bits != 4:
            raise ValueError(f"double quantization is for the 4-bit formats, not {format}")
        scales, scale_absmax, scale_offset = _quantize_scales(scales, group_ndim)
    return QuantizedTensor(codes, scales, scale_absmax, scale_offset, format, block, columns)


def dequantize(tensor: QuantizedTensor, dtype=jnp.float32) -> jax.Array:
    """The float array [..., columns] in `dtype` (values computed in float32)."""
    fmt = FORMATS[tensor.format]
    scales = tensor.scales
    if tensor.double_quantized:
        scales = dequantize_scales(scales, tensor.scale_absmax, tensor.scale_offset)
    values = fmt.dequantize(tensor.codes, scales, tensor.block)
    return values[..., :tensor.columns].astype(dtype)


def _quantize_scales(scales: np.ndarray, group_ndim: int):
    """bitsandbytes' double quantization of float32 absmax values [*groups, ...]: per
    group, subtract the mean and quantize to the dynamic map in blocks of 256."""
    groups = scales.shape[:group_ndim]
    flat = scales.reshape(*groups, -1)
    offset = flat.mean(axis=-1, dtype=np.float32).astype(np.float32)
    centred = flat - offset[..., None]
    count = math.ceil(flat.shape[-1] / SCALE_BLOCK)
    padded = np.zeros((*groups, count * SCALE_BLOCK), np.float32)
    padded[..., :flat.shape[-1]] = centred
    blocks = padded.reshape(*groups, count, SCALE_BLOCK)
    absmax = np.abs(blocks).max(axis=-1)
    # bitsandbytes' CPU routine divides each value by its block's absmax.
    normed = blocks / np.maximum(absmax, np.float32(1e-38))[..., None]
    bounds, _ = codebooks.midpoints(codebooks.DYNAMIC)
    codes = np.searchsorted(bounds, np.clip(normed, -1, 1), side="left").astype(np.uint8)
    codes = codes.reshape(*groups, -1)[..., :flat.shape[-1]].reshape(scales.shape)
    return codes, absmax.astype(np.float32), offset


def dequantize_scales(codes, absmax, offset):
    groups = absmax.shape[:-1]
    flat = codes.reshape(*groups, -1)
    size = flat.shape[-1]
    padded = jnp.pad(flat, [(0, 0)] * len(groups) + [(0, absmax.shape[-1] * SCALE_BLOCK - size)])
    values = jnp.asarray(codebooks.DYNAMIC)[padded.astype(jnp.int32)].reshape(
        *groups, -1, SCALE_BLOCK) * absmax[..., None]
    values = values.reshape(*groups, -1)[..., :size] + offset[..., None]
    return values.reshape(codes.shape)
