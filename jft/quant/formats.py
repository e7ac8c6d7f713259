"""Block-wise quantization formats: how a block of values becomes codes and a scale, and
back.

Each format quantizes on the host, in NumPy (a checkpoint is quantized layer by layer as
it loads, never whole on the device), and dequantizes in JAX (inside the layer scan,
just before the matmul). Values are grouped in blocks of `block` consecutive elements
along the last axis; a block's scale is a float, one code per element.

- `nf4`, `fp4`: bitsandbytes' 4-bit types (QLoRA). scale = the block's absmax; a value
  rounds to the nearest of 16 levels (`codebooks.NF4`, `codebooks.FP4`) of value/absmax;
  two codes per byte, the even element in the high nibble. Bit for bit what
  `bitsandbytes.functional.quantize_4bit` computes.
- `int8`: symmetric absmax: q = round(127 value / absmax), value = q absmax / 127.
- `q8_0`, `q4_0`: llama.cpp's (GGUF's) formats, blocks of 32 with a float16 scale d:
  q8_0 value = d q (q int8); q4_0 value = d (q - 8), q in 0..15, the block's first 16
  elements in the low nibbles of its 16 bytes and the last 16 in the high ones. Kept as
  the file stores them, so a GGUF model trains at its file's size.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import gguf
import jax.numpy as jnp
import numpy as np

from jft.quant import codebooks


class Format(Protocol):
    name: str
    bits: int  # per code
    fixed_block: int | None  # the format's own block size (GGUF's), or None: any

    def quantize(self, blocks: np.ndarray, partial: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 blocks [..., n, block] (zero-padded; `partial` [n] marks the ones that
        are) -> (codes [..., n * block * bits / 8] uint8 or int8, scales [..., n])."""

    def dequantize(self, codes, scales, block: int):
        """Inverse, in JAX: float32 [..., n * block]."""


@dataclasses.dataclass(frozen=True)
class Codebook4Bit:
    """A 4-bit lookup-table format with absmax scales (NF4, FP4)."""

    name: str
    code: np.ndarray
    bits: int = 4
    fixed_block: int | None = None

    def quantize(self, blocks, partial):
        absmax = np.abs(blocks).max(axis=-1)
        # bitsandbytes multiplies full blocks by 1/absmax and divides the ragged last one;
        # the two differ in the last bit, which can move a value across a midpoint.
        safe = np.maximum(absmax, np.float32(1e-38))[..., None]
        scaled = np.where(partial[:, None], blocks / safe, blocks * (np.float32(1) / safe))
        bounds, order = codebooks.midpoints(self.code)
        codes = order[np.searchsorted(bounds, np.clip(scaled, -1, 1), side="left")]
        codes = codes.astype(np.uint8).reshape(*blocks.shape[:-2], -1)
        return (codes[..., 0::2] << 4) | codes[..., 1::2], absmax.astype(np.float32)

    def dequantize(self, codes, scales, block):
        indices = jnp.stack([codes >> 4, codes & 0xF], axis=-1).reshape(*codes.shape[:-1], -1)
        values = jnp.asarray(self.code)[indices.astype(jnp.int32)]
        return _scale_blocks(values, scales, block)


@dataclasses.dataclass(frozen=True)
class Int8Absmax:
    name: str = "int8"
    bits: int = 8
    fixed_block: int | None = None

    def quantize(self, blocks, partial):
        absmax = np.abs(blocks).max(axis=-1)
        scaled = blocks / np.maximum(absmax, np.float32(1e-38))[..., None] * np.float32(127)
        codes = np.rint(np.clip(scaled, -127, 127)).astype(np.int8)
        return codes.reshape(*blocks.shape[:-2], -1), absmax.astype(np.float32)

    def dequantize(self, codes, scales, block):
        return _scale_blocks(codes.astype(jnp.float32), scales / 127, block)


@dataclasses.dataclass(frozen=True)
class GGMLFormat:
    """A GGUF block format, quantized by the `gguf` package; a block is stored as its
    float16 scale d and its codes, which are split here into `scales` and `codes`."""

    name: str
    qtype: gguf.GGMLQuantizationType
    bits: int
    fixed_block: int | None = 32

    def quantize(self, blocks, partial):
        raw = gguf.quants.quantize(blocks.reshape(-1, blocks.shape[-1]), self.qtype)
        return self.split(raw.reshape(*blocks.shape[:-2], -1))

    def split(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """GGUF's bytes, [..., n blocks * bytes per block] -> (codes, scales float16)."""
        blocks = raw.reshape(*raw.shape[:-1], -1, 2 + 32 * self.bits // 8)
        scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
        codes = blocks[..., 2:]
        if self.bits == 8:
            codes = codes.view(np.int8)
        return codes.reshape(*raw.shape[:-1], -1), scales

    def join(self, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """Inverse of `split`: the bytes GGUF stores."""
        blocks = codes.view(np.uint8).reshape(*scales.shape, -1)
        return np.concatenate([scales.astype(np.float16)[..., None].view(np.uint8), blocks],
                              axis=-1).reshape(*scales.shape[:-1], -1)

    def dequantize(self, codes, scales, block):
        if self.bits == 8:
            values = codes.astype(jnp.float32)
        else:
            grouped = codes.reshape(*codes.shape[:-1], -1, 16)  # a block's 16 bytes
            nibbles = jnp.concatenate([grouped & 0xF, grouped >> 4], axis=-1)
            values = nibbles.reshape(codes.shape[:-1] + (-1,)).astype(jnp.float32) - 8
        return _scale_blocks(values, scales.astype(jnp.float32), block)


def _scale_blocks(values, scales, block):
    shaped = values.reshape(*values.shape[:-1], -1, block)
    return (shaped * scales[..., None]).reshape(values.shape)


FORMATS: dict[str, Format] = {
    "nf4": Codebook4Bit("nf4", codebooks.NF4),
    "fp4": Codebook4Bit("fp4", codebooks.FP4),
    "int8": Int8Absmax(),
    "q8_0": GGMLFormat("q8_0", gguf.GGMLQuantizationType.Q8_0, 8),
    "q4_0": GGMLFormat("q4_0", gguf.GGMLQuantizationType.Q4_0, 4),
}
# The formats a `quantize:` setting may name; the GGUF ones come from a file.
QUANTIZE_CHOICES = ("nf4", "fp4", "int8")
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
