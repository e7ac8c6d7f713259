"""Merging LoRA adapters into one LoRA, factor by factor: HF PEFT's `cat` and `svd`
(`LoraModel.add_weighted_adapter`), over jft's layout, in NumPy.

One module's input is a list of `(entry, scales)`: `entry["a"]` [L, *in, r_t] and
`entry["b"]` [L, r_t, *out] as in a jft LoRA delta, and `scales` [L] the per-layer
s_t = alpha_t / r_t (rsLoRA: alpha_t / sqrt(r_t); 0 where a layer is not targeted), so
that ΔW_t = s_t · a_t @ b_t in jft's [in, out] layout. `module_loras` builds these from a
delta and its LoraConfig.

The output, `LoraFactors(a, b, alpha, r)`, carries every weight and scale in its factors:
its own scale is 1, as PEFT's merged adapter (lora_alpha = r) has. Use it as
`LoraConfig(r=r, alpha=alpha, rslora=...)` with the same `rslora` you passed (alpha is r,
or sqrt(r) under rsLoRA; PEFT instead copies use_rslora from the first adapter and keeps
lora_alpha = r, which scales an rsLoRA merge by sqrt(r)).

- `cat`: a = [w_1 s_1 a_1 | w_2 s_2 a_2 | ...] along the rank, b = [b_1; b_2; ...], new
  rank Σ r_t. The weight and the scale go, unsquared, on the A side only, as PEFT's
  `lora_A * weight * scaling`, so the factors equal PEFT's and ΔW = Σ_t w_t ΔW_t exactly
  (up to float rounding).
- `svd`: ΔW = Σ_t w_t ΔW_t, truncated to `rank` singular triplets. PEFT factors its
  [out, in] ΔW as lora_B = U S, lora_A = Vh; in jft's [in, out] layout that is
  a = the left singular vectors (orthonormal columns) and b = S · the right ones: the
  singular values go on the b (output, PEFT's lora_B) side. `clamp` is PEFT's quantile
  clamp over both factors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from jft.errors import JftError

ModuleLora = tuple[Mapping[str, Any], Any]  # (delta entry {"a", "b"}, scales [L])


class LoraFactors(NamedTuple):
    """A merged module: a [L, *in, r], b [L, r, *out]; scale alpha / r (or / sqrt(r)) = 1."""

    a: np.ndarray
    b: np.ndarray
    alpha: float
    r: int


def module_loras(delta: Mapping, model, config) -> dict[str, ModuleLora]:
    """module -> (entry, scales [L]) of a jft LoRA delta, with the padding of per-layer
    ranks (rank_pattern) masked out of a. DoRA's magnitude has no factor form: refused."""
    from jft.peft.lora import plan

    if config.dora:
        raise JftError("config.dora: DoRA's magnitude rescaling cannot be merged as factors")
    loras = {}
    for module, p in plan(model, config).items():
        entry = delta["layers"][module]
        a = np.asarray(entry["a"])
        mask = p.rank_mask().reshape(a.shape[0], *([1] * (a.ndim - 2)), a.shape[-1])
        loras[module] = ({"a": a * mask.astype(a.dtype), "b": np.asarray(entry["b"])},
                         np.asarray(p.scales, np.float64))
    return loras


def delta_weight(entry: Mapping[str, Any], scales: Any) -> np.ndarray:
    """ΔW = s · a @ b per layer, [L, *in, *out], in float64."""
    a, b = np.asarray(entry["a"], np.float64), np.asarray(entry["b"], np.float64)
    product = np.einsum("lir,lro->lio", a.reshape(a.shape[0], -1, a.shape[-1]),
                        b.reshape(b.shape[0], b.shape[1], -1))
    product *= np.asarray(scales, np.float64)[:, None, None]
    return product.reshape(*a.shape[:-1], *b.shape[2:])


def cat(loras: Sequence[ModuleLora], weights: Sequence[float], *,
        rslora: bool = False) -> LoraFactors:
    """PEFT's `cat`: the factors side by side, rank Σ r_t, ΔW = Σ_t w_t s_t a_t b_t."""
    entries, dtype = _check(loras, weights)
    a_parts, b_parts = [], []
    for (a, b, scales), weight in zip(entries, weights, strict=True):
        # (a · w) · s in the factors' dtype, the order and precision of PEFT's
        # `lora_A * weight * scaling`, so float32 factors come out bit for bit.
        scales = scales.astype(dtype).reshape(-1, *([1] * (a.ndim - 1)))
        a_parts.append(a.astype(dtype) * dtype.type(weight) * scales)
        b_parts.append(b.astype(dtype))
    a = np.concatenate(a_parts, axis=-1)  # [L, *in, Σr]
    b = np.concatenate(b_parts, axis=1)  # [L, Σr, *out]
    r = a.shape[-1]
    return LoraFactors(a, b, _alpha(r, rslora), r)


def svd(loras: Sequence[ModuleLora], weights: Sequence[float], rank: int,
        clamp: float | None = None, *, rslora: bool = False) -> LoraFactors:
    """PEFT's `svd`: Σ_t w_t ΔW_t truncated to `rank` by SVD, per layer.

    The SVD is taken through the concatenated factors (QR of each side, then the SVD of a
    small Σr × Σr core), which gives the same singular triplets as PEFT's dense
    `torch.linalg.svd` of ΔW at a fraction of the cost. Each pair's sign is fixed so that
    the largest-magnitude entry of a's column is positive (LAPACK's is arbitrary, so
    PEFT's signs may differ; ΔW does not, but `clamp`'s quantile can). Ranks beyond
    ΔW's own get zero b rows and a columns completing an orthonormal basis, as the
    full SVD gives. `clamp` (a quantile in [0, 1]): hi = quantile of all entries of both
    factors (linear interpolation, as torch.quantile), both clamped to [−hi, hi].
    """
    entries, dtype = _check(loras, weights)
    a0, b0, _ = entries[0]
    dims_in, dims_out = a0.shape[1:-1], b0.shape[2:]
    size_in, size_out = math.prod(dims_in), math.prod(dims_out)
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or not (
            1 <= rank <= min(size_in, size_out)):
        raise JftError(f"rank must be an integer in 1..{min(size_in, size_out)} (the "
                       f"module's smaller dimension), got {rank!r}")
    if clamp is not None and not 0.0 <= clamp <= 1.0:
        raise JftError(f"clamp must be a quantile in [0, 1] or None, got {clamp!r}")
    num_layers = a0.shape[0]
    a_out = np.zeros((num_layers, size_in, rank), dtype)
    b_out = np.zeros((num_layers, rank, size_out), dtype)
    for layer in range(num_layers):
        # The weighted, scaled factors side by side: ΔW = left @ right, [in, Σr] x [Σr, out].
        left = np.concatenate([a[layer].reshape(size_in, -1).astype(np.float64) * (w * s[layer])
                               for (a, _, s), w in zip(entries, weights, strict=True)], axis=1)
        right = np.concatenate([b[layer].reshape(-1, size_out) for _, b, _ in entries])
        vectors, values, right_vectors = _low_rank_svd(left, right, rank)
        a_l, b_l = vectors, values[:, None] * right_vectors  # S on the output side
        if clamp is not None:
            a_l, b_l = clamp_factors(a_l, b_l, clamp)
        a_out[layer], b_out[layer] = a_l, b_l
    return LoraFactors(a_out.reshape(num_layers, *dims_in, rank),
                       b_out.reshape(num_layers, rank, *dims_out), _alpha(rank, rslora), rank)


def clamp_factors(a: np.ndarray, b: np.ndarray, quantile: float) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's `svd_clamp` on one layer's factors: hi = the `quantile` of all entries of
    both (linear interpolation, as torch.quantile), and each clamped to [−hi, hi]."""
    hi = np.quantile(np.concatenate([np.ravel(b), np.ravel(a)]), quantile)
    return np.clip(a, -hi, hi), np.clip(b, -hi, hi)


def _low_rank_svd(left: np.ndarray, right: np.ndarray, rank: int):
    """The top `rank` singular triplets of left @ right ([in, R] x [R, out], float64):
    (u [in, rank], s [rank], vt [rank, out]), zero-padded past ΔW's rank."""
    q_left, r_left = np.linalg.qr(left.astype(np.float64))  # [in, p], [p, R]
    q_right, r_right = np.linalg.qr(right.T.astype(np.float64))  # [out, q], [q, R]
    u_core, s, vt_core = np.linalg.svd(r_left @ r_right.T)  # [p, p], [min], [q, q]
    keep = min(rank, s.size)
    u = q_left @ u_core[:, :keep]  # [in, keep]
    vt = vt_core[:keep] @ q_right.T  # [keep, out]
    # A deterministic sign per pair: the largest-|.| entry of each u column positive.
    flip = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(keep)])
    flip[flip == 0] = 1.0
    u, vt = u * flip, vt * flip[:, None]
    if keep < rank:  # complete u's columns to an orthonormal set; their values are zero
        extra = np.random.default_rng(0).standard_normal((u.shape[0], rank - keep))
        extra -= u @ (u.T @ extra)
        u = np.concatenate([u, np.linalg.qr(extra)[0]], axis=1)
        vt = np.concatenate([vt, np.zeros((rank - keep, vt.shape[1]))])
        s = np.concatenate([s[:keep], np.zeros(rank - keep)])
    return u, s[:rank], vt


def _check(loras: Sequence[ModuleLora], weights: Sequence[float]):
    """[(a, b, scales)] as NumPy arrays, and the output dtype (float64 if any factor is)."""
    if len(loras) == 0:
        raise JftError("loras: need at least one (entry, scales) pair to merge")
    if len(weights) != len(loras):
        raise JftError(f"weights: got {len(weights)} for {len(loras)} adapters")
    entries = []
    for t, (entry, scales) in enumerate(loras):
        a, b = np.asarray(entry["a"]), np.asarray(entry["b"])
        scales = np.asarray(scales, np.float64)
        if a.ndim < 3 or b.ndim < 3 or a.shape[-1] != b.shape[1] or a.shape[0] != b.shape[0]:
            raise JftError(f"loras[{t}]: a {a.shape} and b {b.shape} are not [L, *in, r] "
                           f"and [L, r, *out] with the same L and r")
        if scales.shape != (a.shape[0],):
            raise JftError(f"loras[{t}]: scales has shape {scales.shape}, expected "
                           f"({a.shape[0]},), one per layer")
        a0, b0, _ = entries[0] if entries else (a, b, scales)
        if a.shape[:-1] != a0.shape[:-1] or b.shape[2:] != b0.shape[2:]:
            raise JftError(f"loras[{t}]: layers/in/out dims {a.shape[:-1]} -> {b.shape[2:]} "
                           f"differ from loras[0]'s {a0.shape[:-1]} -> {b0.shape[2:]}")
        entries.append((a, b, scales))
    wide = any(x.dtype == np.float64 for a, b, _ in entries for x in (a, b))
    return entries, np.dtype(np.float64 if wide else np.float32)


def _alpha(r: int, rslora: bool) -> float:
    """The alpha that makes the scale 1 at rank r."""
    return math.sqrt(r) if rslora else float(r)
