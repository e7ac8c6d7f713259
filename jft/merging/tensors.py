"""The per-tensor maths of task-vector merging, in NumPy.

Every function takes one leaf of each task vector τ_t = θ_t − θ_base (float32 in
practice), computes in float64, and `merge_tensors` returns float32. Two ecosystem
anchors, whose conventions differ and are followed method by method:

- HF PEFT (`peft.utils.merge_utils`, behind LoRA's `add_weighted_adapter`): `linear`,
  `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`. Each τ_t is pruned unweighted,
  signs are elected on the pruned *unweighted* stack, the weights come after, and the
  disjoint mean divides by the number of agreeing tensors. DARE rescales by 1/density.
- mergekit (`merge_methods/generalized_task_arithmetic.py`, `sparsify.py`): `breadcrumbs`,
  `breadcrumbs_ties`, `della`, `della_linear`. Each τ_t is sparsified, then weighted, and
  signs are elected on the *weighted* stack; only `della` normalises, by the agreeing
  tensors' summed weights.

Random methods draw one uniform u per entry from `np.random.default_rng([seed, t])` for
input t and keep the entry when u < its keep probability, so a tensor's mask depends on
the seed and its own index only.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

from jft.errors import JftError

MERGE_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune",
                 "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")
RANDOM_METHODS = ("dare_linear", "dare_ties", "della", "della_linear")
SIGN_METHODS = ("total", "frequency")

# ------------------------------------------------------------------ sparsifiers


def magnitude_mask(x: np.ndarray, density: float) -> np.ndarray:
    """Keeps the k = int(density · x.size) entries of largest |x| over the whole tensor.

    PEFT's `magnitude_based_pruning` (and TIES' trim step, per tensor): the count is
    truncated, so a small tensor can keep nothing; density >= 1 keeps everything, as
    PEFT's `prune` does. Equal magnitudes are taken in flat-index order. Returns a bool
    mask of x's shape.
    """
    x = np.asarray(x)
    if density >= 1:
        return np.ones(x.shape, dtype=bool)
    k = int(density * x.size)
    order = np.argsort(-np.abs(x).ravel(), kind="stable")  # largest |x| first
    mask = np.zeros(x.size, dtype=bool)
    mask[order[:k]] = True
    return mask.reshape(x.shape)


def random_mask(x: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    """DARE's drop: keeps each entry independently with probability `density`,
    m ~ Bernoulli(density) (PEFT's `random_pruning`, mergekit's `bernoulli`), drawn as
    u ~ U[0, 1) per entry and m = u < density. Returns a bool mask of x's shape."""
    return rng.random(np.shape(x)) < density


def breadcrumbs_mask(x: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """Model Breadcrumbs' two-tailed mask over the whole tensor (mergekit's
    `magnitude_outliers`).

    With n = x.size: keep = int(density·n), top = int(gamma·n), bottom = n − keep − top.
    The `top` largest |x| (outliers) and the `bottom` smallest are dropped; when
    bottom < 0 (gamma >= 1 − density) fewer outliers are dropped (top += bottom,
    bottom = 0) so that `keep` entries survive. density >= 1 keeps everything.
    Unlike mergekit (whose `[n_bot:-n_top]` slice keeps nothing when top = 0, e.g. any
    tensor under 100 entries at gamma = 0.01), top = 0 drops no outliers.
    """
    x = np.asarray(x)
    if density >= 1:
        return np.ones(x.shape, dtype=bool)
    n = x.size
    keep, top = int(density * n), int(gamma * n)
    bottom = n - keep - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    order = np.argsort(np.abs(x).ravel(), kind="stable")  # smallest |x| first
    mask = np.zeros(n, dtype=bool)
    mask[order[bottom:n - top]] = True
    return mask.reshape(x.shape)


def della_mask(x: np.ndarray, density: float, epsilon: float, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """DELLA's MagPrune (mergekit's `della_magprune`): per row (the last axis), the entry
    of magnitude rank r (0 = smallest of the row's n) is kept with probability

        p = density − epsilon + 2·epsilon · r / (n − 1)

    rising linearly from density − ε to density + ε (p = density when n = 1). Ranks of
    equal magnitudes follow index order. Returns (mask, p), both of x's shape, p for the
    DARE-like rescale τ·m/p. density >= 1 keeps everything with p = 1, as mergekit does.
    A 0-d or 1-D x is one row; mergekit ranks along axis 1, the same as the last axis for
    the 1-D and 2-D tensors it sees.
    """
    x = np.asarray(x)
    if density >= 1:
        return np.ones(x.shape, dtype=bool), np.ones(x.shape)
    if not (0 <= epsilon < density and density + epsilon <= 1):
        raise JftError(f"epsilon {epsilon}: della needs 0 <= epsilon < density and "
                       f"density + epsilon <= 1 (density is {density})")
    width = x.shape[-1] if x.ndim else 1
    rows = np.abs(x).reshape(-1, width) if x.size else np.zeros((0, width))
    ranks = np.argsort(np.argsort(rows, axis=-1, kind="stable"), axis=-1, kind="stable")
    scaled = ranks / (width - 1) if width > 1 else np.full(rows.shape, 0.5)
    probs = (density - epsilon + 2 * epsilon * scaled).reshape(x.shape)
    return rng.random(x.shape) < probs, probs


# ------------------------------------------------------------------ sign consensus


def elect_sign(stack: np.ndarray, method: str = "total") -> np.ndarray:
    """TIES' elected sign per coordinate of a [T, ...] stack, as ±1 floats.

    "total": γ = sign(Σ_t τ_t) (the TIES paper's mass; mergekit's "sum");
    "frequency": γ = sign(Σ_t sign(τ_t)) (mergekit's "count"). A zero score elects +1.
    PEFT's `calculate_majority_sign_mask` before its comparison.
    """
    stack = np.asarray(stack, dtype=np.float64)
    if method == "total":
        score = stack.sum(axis=0)
    elif method == "frequency":
        score = np.sign(stack).sum(axis=0)
    else:
        raise JftError(f"majority_sign {method!r}: expected one of {', '.join(SIGN_METHODS)}")
    return np.where(score >= 0, 1.0, -1.0)


def disjoint_merge(stack: np.ndarray, signs: np.ndarray,
                   weights: Sequence[float] | None = None) -> np.ndarray:
    """TIES' disjoint mean, PEFT's `disjoint_merge`:

        a_t = [sign(τ_t) = γ]   (so a zero entry never agrees)
        τ_m = Σ_t w_t τ_t a_t / max(Σ_t a_t, 1)

    Agreement is judged on the unweighted `stack`; `weights` (default all 1) scale only
    the numerator and the denominator counts tensors, as in PEFT's `ties`.
    """
    stack = np.asarray(stack, dtype=np.float64)
    agree = np.sign(stack) == signs
    values = stack if weights is None else _broadcast(weights, stack) * stack
    return (values * agree).sum(axis=0) / np.maximum(agree.sum(axis=0), 1)


# ------------------------------------------------------------------ merging


def merge_tensors(method: str, tensors: Sequence[np.ndarray], weights: Sequence[float], *,
                  density: float = 1.0, seed: int = 0, majority_sign: str = "total",
                  gamma: float = 0.01, epsilon: float = 0.15, rescale: bool = True
                  ) -> np.ndarray:
    """One leaf of the merged task vector from the inputs' leaves τ_t and weights w_t.

    PEFT (`merge_utils`), with m_t the mask of τ_t and γ from `elect_sign` on the
    pruned, unweighted τ̂_t:
      linear           Σ_t w_t τ_t   (task arithmetic; negative weights subtract)
      magnitude_prune  Σ_t w_t τ̂_t, τ̂_t = τ_t·magnitude_mask
      ties             disjoint_merge(τ̂, γ, w), τ̂_t = τ_t·magnitude_mask
      dare_linear      Σ_t w_t τ̂_t, τ̂_t = τ_t·random_mask / density
      dare_ties        disjoint_merge(τ̂, γ, w), τ̂ as in dare_linear
    mergekit (`GeneralizedTaskArithmeticMerge`), with δ_t = w_t τ̂_t, γ elected on δ
    and a_t = [sign(δ_t) = γ]:
      breadcrumbs      Σ_t δ_t, τ̂_t = τ_t·breadcrumbs_mask (no rescale, no normalise)
      breadcrumbs_ties Σ_t δ_t a_t
      della_linear     Σ_t δ_t, τ̂_t = τ_t·m_t / p_t from della_mask
      della            Σ_t δ_t a_t / Σ_t w_t a_t (a zero divisor becomes 1)

    `rescale=False` drops the 1/density (DARE) and 1/p (DELLA) factors; the other methods
    never rescale. DELLA's 1/p is the paper's and mergekit's original rescale; mergekit
    now matches the L1 norm instead. `density` (in (0, 1]) is ignored by `linear`,
    `gamma` by all but breadcrumbs, `epsilon` by all but della, `seed` by the methods
    not in RANDOM_METHODS.
    """
    stack, w = _checked(method, tensors, weights, density, seed, majority_sign, gamma)
    wb = _broadcast(w, stack)
    if method == "linear":
        merged = (wb * stack).sum(axis=0)
    elif method in ("magnitude_prune", "ties"):
        pruned = np.stack([t * magnitude_mask(t, density) for t in stack])
        merged = _peft_combine(method == "ties", pruned, w, majority_sign)
    elif method in ("dare_linear", "dare_ties"):
        scale = 1 / density if rescale else 1.0
        pruned = np.stack([t * random_mask(t, density, _rng(seed, i)) * scale
                           for i, t in enumerate(stack)])
        merged = _peft_combine(method == "dare_ties", pruned, w, majority_sign)
    elif method in ("breadcrumbs", "breadcrumbs_ties"):
        weighted = wb * np.stack([t * breadcrumbs_mask(t, density, gamma) for t in stack])
        merged = weighted.sum(axis=0)
        if method == "breadcrumbs_ties":
            merged = (weighted * (np.sign(weighted) == elect_sign(weighted, majority_sign))
                      ).sum(axis=0)
    else:  # della, della_linear
        sparse = []
        for i, t in enumerate(stack):
            mask, probs = della_mask(t, density, epsilon, _rng(seed, i))
            sparse.append(np.where(mask, t / probs if rescale else t, 0.0))
        weighted = wb * np.stack(sparse)
        merged = weighted.sum(axis=0)
        if method == "della":
            agree = np.sign(weighted) == elect_sign(weighted, majority_sign)
            divisor = (wb * agree).sum(axis=0)
            merged = (weighted * agree).sum(axis=0) / np.where(divisor == 0, 1.0, divisor)
    return merged.astype(np.float32)


def _peft_combine(ties: bool, pruned: np.ndarray, weights: np.ndarray, majority_sign: str
                  ) -> np.ndarray:
    """PEFT's tail after pruning: weighted sum, or (ties) signs elected on the unweighted
    pruned stack followed by the weighted disjoint mean."""
    if ties:
        return disjoint_merge(pruned, elect_sign(pruned, majority_sign), weights)
    return (_broadcast(weights, pruned) * pruned).sum(axis=0)


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def _broadcast(weights, stack: np.ndarray) -> np.ndarray:
    """[T] weights as [T, 1, ...] against a [T, ...] stack."""
    return np.asarray(weights, dtype=np.float64).reshape((-1,) + (1,) * (stack.ndim - 1))


def _checked(method, tensors, weights, density, seed, majority_sign, gamma):
    """The inputs as a float64 [T, ...] stack and [T] weights; JftError naming the field
    that is wrong."""
    if method not in MERGE_METHODS:
        raise JftError(f"method {method!r}: expected one of {', '.join(MERGE_METHODS)}")
    if not isinstance(density, numbers.Real) or not 0 < density <= 1:
        raise JftError(f"density {density}: must be in (0, 1] (the fraction of each task "
                       "vector kept)")
    if majority_sign not in SIGN_METHODS:
        raise JftError(f"majority_sign {majority_sign!r}: expected one of "
                       f"{', '.join(SIGN_METHODS)}")
    if not isinstance(gamma, numbers.Real) or not 0 <= gamma <= 1:
        raise JftError(f"gamma {gamma}: must be in [0, 1] (the fraction of largest "
                       "magnitudes breadcrumbs drops)")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise JftError(f"seed {seed!r}: must be a non-negative integer")
    if len(tensors) == 0:
        raise JftError("tensors: nothing to merge (no inputs)")
    arrays = [np.asarray(t, dtype=np.float64) for t in tensors]
    for index, array in enumerate(arrays[1:], start=1):
        if array.shape != arrays[0].shape:
            raise JftError(f"tensors: input {index} has shape {array.shape}, input 0 has "
                           f"{arrays[0].shape}; task vectors must share the base's shapes")
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(arrays),):
        raise JftError(f"weights: {w.size} given for {len(arrays)} tensors; give one weight "
                       "per input")
    if not all(math.isfinite(value) for value in w):
        raise JftError(f"weights {w.tolist()}: must be finite numbers")
    return np.stack(arrays), w
