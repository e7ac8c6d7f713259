"""The code values 4-bit and 8-bit block-wise quantization rounds to.

NF4 and FP4 are bitsandbytes' (QLoRA's) 4-bit types; the dynamic map is the signed 8-bit
"dynamic tree" type bitsandbytes quantizes NF4's block constants with (double
quantization). Each is a sorted-or-indexed table of float32 values in [-1, 1]: a code is
an index into it.
"""

from __future__ import annotations

import numpy as np

# QLoRA's NormalFloat-4 (paper, appendix E): quantiles of N(0, 1) normalised to [-1, 1],
# 7 negative levels, an exact zero and 8 positive ones, sorted, so the code is the index.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)

# bitsandbytes' FP4 (1 sign bit, 2 exponent bits, 1 mantissa bit, exponent bias 2),
# normalised by its largest value 12 and indexed by the 4-bit pattern: bit 3 is the sign.
_FP4_MAGNITUDES = np.array([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]) / 12.0
FP4 = np.concatenate([_FP4_MAGNITUDES, -_FP4_MAGNITUDES]).astype(np.float32)


def dynamic_map(max_exponent_bits: int = 7) -> np.ndarray:
    """The signed 8-bit dynamic map (Dettmers, "8-bit approximations for parallelism in
    deep learning"): for each exponent 10^-(e-1) .. 10^0, the midpoints of a linear grid
    over [0.1, 1] whose size doubles with the exponent, both signs, plus 0 and 1; sorted.
    """
    values = [np.float32(0.0), np.float32(1.0)]
    for i in range(max_exponent_bits):
        grid = _float32_grid(0.1, 1.0, 2**i + 1)
        means = (grid[:-1] + grid[1:]) / np.float32(2)
        scale = np.float32(10.0 ** (-(max_exponent_bits - 1) + i))  # products in float32
        values += list(scale * means) + list(-scale * means)
    return np.sort(np.asarray(values, np.float32))


def _float32_grid(start: float, stop: float, count: int) -> np.ndarray:
    """`count` evenly spaced float32 values as torch.linspace makes them (bitsandbytes
    builds its map with it): a float32 step, each point start + i*step (from the stop
    end in the upper half) rounded once. np.linspace rounds differently in the last bit,
    which would change a few of the map's values."""
    start32, stop32 = np.float32(start), np.float32(stop)
    step = np.float64((stop32 - start32) / np.float32(count - 1))
    i = np.arange(count, dtype=np.float64)
    grid = np.where(i < count // 2, np.float64(start32) + i * step,
                    np.float64(stop32) - (count - 1 - i) * step)
    return grid.astype(np.float32)


DYNAMIC = dynamic_map()


def midpoints(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bounds between consecutive sorted values, the sorting order): a value rounds to
    code `order[searchsorted(bounds, value)]`, the nearest, ties to the smaller."""
    order = np.argsort(code, kind="stable")
    ordered = code[order]
    return ((ordered[:-1] + ordered[1:]) / np.float32(2)).astype(np.float32), order
