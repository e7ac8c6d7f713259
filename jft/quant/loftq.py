"""LoftQ (Li et al. 2023, arXiv 2310.08659): a quantized weight Q and LoRA factors A, B
chosen together, so that the quantized model with its adapter starts at the float one:
dequantize(Q) + s A B ~ W, where plain QLoRA starts at dequantize(quantize(W)) (B = 0).

The alternating algorithm, as PEFT's `utils/loftq_utils.py` (`loftq_init`) runs it, for
T = `iterations`:

    R = W
    for t in 1..T:
        Q = quantize(R);  D = dequantize(Q)
        W - D = U S V^T                  (exact SVD)
        L = U_r S_r V_r^T                (its best rank-r approximation)
        R = W - L                        (only used by the next step)
    return Q, and the factors of L

So T = 1 keeps plain quantization's Q (bit for bit) and adds the rank-r SVD of its
error; each further step quantizes what the low-rank part leaves.

Where this differs from PEFT, on purpose:
- Q is quantized with the base's own settings (format, block size, double quantization:
  a `QuantizeSpec`), so D is exactly what the model will dequantize; PEFT's LoftQ uses
  NF4 without double quantization (or its own uniform/normal quantizer for 2 and 8 bits).
- The factors are divided by sqrt(s) each (s = alpha / r, or alpha / sqrt(r)), so the
  model at init, D + s A B, is the LoftQ approximation of W for any alpha. PEFT assigns
  lora_A = sqrt(S_r) V_r^T, lora_B = U_r sqrt(S_r) unscaled, which matches W only when
  s = 1 (alpha = r, as its LoftQ examples set).
- Factors are in jft's layout (x A B): A = V_r sqrt(S_r / s) [in, r] (PEFT's lora_A
  transposed) and B = sqrt(S_r / s) U_r^T [r, *out] (lora_B transposed).

Everything runs on the host in NumPy (quantization, products) except the SVD, which
runs in JAX (float32) on the default device.

Each step is not guaranteed to lower the error: block absmax quantization is not a
projection onto a fixed set (each block's scale follows its absmax), so when r is a large
fraction of the matrix's smaller side the error can rise again after a few steps. For
r much smaller than the matrix, as in practice, it falls at every step; `errors` reports
it per step.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jft.models.sites import LinearSite
from jft.quant.params import QuantizeSpec, weight_to_matrix
from jft.quant.tensor import QuantizedTensor, dequantize


class LoftQResult(NamedTuple):
    """quantized: Q, in the layout of the matrix it was computed from ([*lead, *out, in]);
    a [*lead, in..., R], b [*lead, R, *out]: jft's LoRA factors (zero beyond each entry's
    rank); errors [*lead, T] (float64): ||W - (dequantize(Q_t) + s A_t B_t)||_F after
    each step t (Frobenius norm over each matrix)."""

    quantized: QuantizedTensor
    a: np.ndarray
    b: np.ndarray
    errors: np.ndarray


def loftq(matrix, spec: QuantizeSpec, rank, scaling=1.0, iterations: int = 1, *,
          lead: int | None = None, width: int | None = None) -> LoftQResult:
    """LoftQ of a float matrix [*lead, *out, in] (the layout `weight_to_matrix` gives:
    quantization blocks run along `in`), each of its `lead` leading entries (the layers of
    a stacked weight; default: all axes but the last two) a matrix of its own.

    rank: an int, or one per lead entry (0: plain quantization, zero factors); scaling:
    LoRA's s, a float or one per entry; width: the factors' rank axis (default: the
    largest rank), zero-padded beyond each entry's rank. Q is `spec.quantize(.,
    group_ndim=lead)`, as a stacked base's weight is quantized. Returns a [*lead, in, R]
    and b [*lead, R, *out] with s (a b)^T the low-rank part of each matrix.
    """
    matrix = np.asarray(matrix, np.float32)
    lead = matrix.ndim - 2 if lead is None else int(lead)
    if not 0 <= lead <= matrix.ndim - 2:
        raise ValueError(f"lead={lead} for a matrix of shape {matrix.shape}")
    iterations = int(iterations)
    if iterations < 1:
        raise ValueError(f"loftq needs at least one iteration, got {iterations}")
    lead_shape, out_dims, size_in = matrix.shape[:lead], matrix.shape[lead:-1], matrix.shape[-1]
    size_out = math.prod(out_dims)
    ranks = np.broadcast_to(np.asarray(rank, np.int64), lead_shape)
    scales = np.broadcast_to(np.asarray(scaling, np.float64), lead_shape)
    top = int(ranks.max(initial=0))
    width = top if width is None else int(width)
    if width < top or top > min(size_out, size_in) or int(ranks.min(initial=0)) < 0:
        raise ValueError(f"loftq ranks {sorted(set(ranks.ravel().tolist()))} (width {width}) "
                         f"for a [{size_out}, {size_in}] matrix")
    if np.any((ranks > 0) & ~(scales > 0)):
        raise ValueError("loftq needs a positive scaling wherever the rank is positive")

    flat = matrix.reshape(-1, size_out, size_in)  # one [out, in] matrix per lead entry
    target = flat.copy()  # R: what is quantized next
    a = np.zeros((flat.shape[0], size_in, width), np.float32)
    b = np.zeros((flat.shape[0], width, size_out), np.float32)
    errors = np.zeros((flat.shape[0], iterations), np.float64)
    for step in range(iterations):
        quantized = spec.quantize(target.reshape(matrix.shape), group_ndim=lead)
        values = np.asarray(_dequantize(quantized)).reshape(flat.shape)
        for i in range(flat.shape[0]):
            r = int(ranks.flat[i])
            residual = flat[i] - values[i]  # W - D, [out, in]
            low = np.zeros_like(residual)
            if r:
                u, s, vt = (np.asarray(x) for x in _svd(residual))
                root = np.sqrt(s[:r] / scales.flat[i]).astype(np.float32)
                a[i, :, :r] = vt[:r].T * root
                b[i, :r] = root[:, None] * u[:, :r].T
                low = np.float32(scales.flat[i]) * (a[i, :, :r] @ b[i, :r]).T
            errors[i, step] = _frobenius(residual - low)
            if step + 1 < iterations:
                target[i] = flat[i] - low
    return LoftQResult(quantized, a.reshape(*lead_shape, size_in, width),
                       b.reshape(*lead_shape, width, *out_dims),
                       errors.reshape(*lead_shape, iterations))


def loftq_weight(site: LinearSite, weight, spec: QuantizeSpec, rank, scaling=1.0,
                 iterations: int = 1, *, lead: int = 1, width: int | None = None) -> LoftQResult:
    """LoftQ of a linear site's weight [*lead, stored layout] (lead=1: a stacked weight,
    `rank` and `scaling` then per layer; lead=0: one layer's). `quantized` is what the
    quantized base holds at that site (`spec.quantize(weight_to_matrix(site, weight,
    lead), group_ndim=lead)` laid out as Q); a [*lead, *in, R] and b [*lead, R, *out] are
    the site's LoRA factors in the delta's layout."""
    weight = np.asarray(weight, np.float32)
    in_dims = site.to_in_out(weight, lead).shape[lead:lead + len(site.in_letters)]
    result = loftq(weight_to_matrix(site, weight, lead), spec, rank, scaling, iterations,
                   lead=lead, width=width)
    a = result.a.reshape(*weight.shape[:lead], *in_dims, result.a.shape[-1])
    return result._replace(a=a)


@jax.jit
def _dequantize(tensor: QuantizedTensor) -> jax.Array:
    return dequantize(tensor, jnp.float32)


@jax.jit
def _svd(matrix):
    return jnp.linalg.svd(matrix, full_matrices=False)


def _frobenius(array: np.ndarray) -> float:
    return math.sqrt(float(np.sum(np.square(array, dtype=np.float64))))


__all__ = ["LoftQResult", "loftq", "loftq_weight"]
