"""Diversity-aware selection on plain arrays: kMQ cluster sampling and the embedding dedup.

kMQ (k-means-quality, "Diversify and Conquer", Yu et al. 2024, arXiv 2409.11378): the pool
is clustered, each cluster gets a share of the budget, and within a cluster items are
drawn without replacement with p(x) proportional to exp(q(x) / temperature). The
iterative variant re-weights clusters between rounds by how badly the model still does
on what was taken from them (`update_cluster_weights`, `weighted_cluster_budgets`).

The Repr Filter (Deita, Liu et al., ICLR 2024) walks the pool in priority order and keeps
an item only if it is not too similar to anything already kept (`greedy_dedup`).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from jft.errors import JftError

Allocation = Literal["proportional", "uniform"]
ALLOCATIONS = ("proportional", "uniform")
# Elements of one [candidates, kept] similarity block in the dedup (16 MiB of float32).
_BLOCK_ELEMENTS = 1 << 22


def cluster_budgets(labels: np.ndarray, budget: int, *, num_clusters: int,
                    allocation: Allocation = "proportional") -> np.ndarray:
    """How many items each cluster gives: [K] int64 summing to exactly min(budget, N).

    "proportional" (the paper): b_j = |D_j| / |D| * b, rounded by largest remainders, so
    each share is within 1 of its exact value and never above the cluster's size.
    "uniform" (the authors' code): b / K each, capped at the cluster's size, with what
    small clusters cannot use spread evenly over the others (water-filling); the few
    items an even split cannot place go to the largest clusters, lower ids first on ties.
    """
    labels = _labels(labels, num_clusters)
    budget = _count(budget, "budget")
    if allocation not in ALLOCATIONS:
        raise JftError(f"allocation: {allocation!r} is not valid; give one of "
                       f"{', '.join(ALLOCATIONS)}")
    sizes = np.bincount(labels, minlength=num_clusters).astype(np.int64)
    total = min(budget, len(labels))
    if total == 0:
        return np.zeros(num_clusters, np.int64)
    if allocation == "proportional":
        # Integer arithmetic: floor(size * total / N) and its remainder, exactly.
        shares, remainders = np.divmod(sizes * total, len(labels))
        extra = np.lexsort((np.arange(num_clusters), -remainders))[:total - shares.sum()]
        shares[extra] += 1
        return shares
    # The largest level L at which min(size, L) summed over clusters still fits the total.
    low, high = 0, int(sizes.max())
    while low < high:
        level = (low + high + 1) // 2
        if np.minimum(sizes, level).sum() <= total:
            low = level
        else:
            high = level - 1
    shares = np.minimum(sizes, low)
    # Fewer items are left than clusters above the level (else L + 1 would fit).
    open_clusters = np.flatnonzero(sizes > low)
    by_size = open_clusters[np.lexsort((open_clusters, -sizes[open_clusters]))]
    shares[by_size[:total - shares.sum()]] += 1
    return shares


def sample_within_clusters(labels: np.ndarray, quality: np.ndarray | None,
                           budgets: np.ndarray, *, temperature: float = 1.0, seed: int = 0,
                           exclude: np.ndarray | None = None) -> np.ndarray:
    """Draws budgets[j] items from each cluster j without replacement, p ∝ exp(q / T).

    labels [N] cluster ids in [0, K); quality [N] (None: all equal, a uniform draw);
    budgets [K]; exclude [N] bool marks items already taken. Returns the drawn indices
    [sum(budgets)] int64 grouped by cluster id, each cluster's in draw order.

    Gumbel-top-k: adding independent Gumbel noise to log p and keeping the k largest is
    exactly k sequential multinomial draws without replacement (each draw from the
    renormalised rest), in that order; log p = q / T up to a constant that does not
    change the ranking.
    """
    budgets = np.asarray(budgets)
    if budgets.ndim != 1 or budgets.dtype.kind not in "iu" or (budgets < 0).any():
        raise JftError(f"budgets: {budgets!r} is not valid; give one count >= 0 per cluster")
    labels = _labels(labels, len(budgets))
    quality = _scores(quality, len(labels), "quality")
    if not (math.isfinite(temperature) and temperature > 0):
        raise JftError(f"temperature: {temperature!r} is not valid; give a number > 0")
    available = np.ones(len(labels), bool)
    if exclude is not None:
        exclude = np.asarray(exclude)
        if exclude.shape != labels.shape or exclude.dtype != bool:
            raise JftError(f"exclude: shape {exclude.shape} ({exclude.dtype}) is not valid; "
                           f"give one bool per item ({len(labels)}), True for taken ones")
        available = ~exclude
    free = np.bincount(labels[available], minlength=len(budgets))
    if (budgets > free).any():
        j = int(np.argmax(budgets > free))
        raise JftError(f"budgets: cluster {j} asks for {budgets[j]} items but has only "
                       f"{free[j]} left; give at most what each cluster has")
    keys = quality / temperature + np.random.default_rng(seed).gumbel(size=len(labels))
    candidates = np.flatnonzero(available)
    # By cluster, then by key, largest first; lexsort is stable, so ties go to lower ids.
    ranked = candidates[np.lexsort((-keys[candidates], labels[candidates]))]
    ranked_labels = labels[ranked]
    first = np.searchsorted(ranked_labels, np.arange(len(budgets)))
    rank = np.arange(len(ranked)) - first[ranked_labels]
    return ranked[rank < budgets[ranked_labels]]


def kmq_select(labels: np.ndarray, quality: np.ndarray | None, budget: int, *,
               temperature: float = 1.0, seed: int = 0,
               allocation: Allocation = "proportional",
               num_clusters: int | None = None) -> np.ndarray:
    """Static kMQ: min(budget, N) indices [int64], cluster shares from `cluster_budgets`,
    drawn within clusters by `sample_within_clusters`. num_clusters defaults to
    max(labels) + 1."""
    labels = np.asarray(labels)
    if num_clusters is None:
        num_clusters = int(labels.max()) + 1 if labels.size and labels.dtype.kind in "iu" else 1
    budgets = cluster_budgets(labels, budget, num_clusters=num_clusters,
                              allocation=allocation)
    return sample_within_clusters(labels, quality, budgets, temperature=temperature,
                                  seed=seed)


def update_cluster_weights(weights: np.ndarray, labels: np.ndarray,
                           scored_indices: np.ndarray, gaps: np.ndarray) -> np.ndarray:
    """Iterative kMQ's re-weighting: w_j <- w_j * softmax(s)_j / sum_i w_i * softmax(s)_i.

    weights [K]; labels [N]; scored_indices [M] the items scored this round, gaps [M] their
    scores (larger = the model still gets it wrong). s_j is the mean gap of cluster j's
    scored items; a cluster with none gets the mean of the other clusters' s_j, so its
    weight moves only by the renormalisation. With nothing scored, the weights come
    back normalised, otherwise unchanged. Returns [K] float64 summing to 1.
    """
    weights = _weights(weights)
    labels = _labels(labels, len(weights))
    scored_indices = np.asarray(scored_indices)
    if scored_indices.ndim != 1 or scored_indices.dtype.kind not in "iu" or (
            scored_indices.size and not 0 <= scored_indices.min() <= scored_indices.max()
            < len(labels)):
        raise JftError("scored_indices: not valid; give item indices from 0 to "
                       f"{len(labels) - 1}")
    gaps = _scores(gaps, len(scored_indices), "gaps")
    clusters = labels[scored_indices]
    counts = np.bincount(clusters, minlength=len(weights))
    if counts.sum() == 0:
        return weights / weights.sum()
    sums = np.bincount(clusters, weights=gaps, minlength=len(weights))
    means = sums[counts > 0] / counts[counts > 0]
    scores = np.full(len(weights), means.mean())
    scores[counts > 0] = means
    soft = np.exp(scores - scores.max())
    new = weights * soft / soft.sum()
    if new.sum() <= 0:
        raise JftError("weights: no cluster with weight > 0 is left; give positive weights")
    return new / new.sum()


def weighted_cluster_budgets(weights: np.ndarray, available: np.ndarray, budget: int,
                             seed: int = 0) -> np.ndarray:
    """One round's shares [K] int64 of iterative kMQ: min(budget, sum(available)) items
    spread over clusters by multinomial counts with p ∝ weights, each capped at
    available[j]; what a cap cuts off is drawn again over the clusters with room
    (by their weights, or by their room where all of those weights are 0)."""
    weights = _weights(weights)
    available = np.asarray(available)
    if available.shape != weights.shape or available.dtype.kind not in "iu" or (
            available < 0).any():
        raise JftError(f"available: {available!r} is not valid; give one count >= 0 per "
                       "cluster (as many as weights)")
    budget = _count(budget, "budget")
    rng = np.random.default_rng(seed)
    shares = np.zeros(len(weights), np.int64)
    left = min(budget, int(available.sum()))
    # Each pass either places everything or fills at least one cluster: at most K passes.
    while left > 0:
        room = available - shares
        p = np.where(room > 0, weights, 0.0)
        if p.sum() <= 0:
            p = room.astype(np.float64)
        drawn = np.minimum(rng.multinomial(left, p / p.sum()), room)
        shares += drawn
        left -= int(drawn.sum())
    return shares


def greedy_dedup(embeddings: np.ndarray, order: np.ndarray, *, threshold: float = 0.9,
                 budget: int | None = None, block: int = 1024) -> np.ndarray:
    """Deita's Repr Filter: indices [int64] kept, in priority order.

    embeddings [N, D]; order [M] distinct item indices, highest priority first (items
    left out are never kept). An item is kept if its cosine similarity to every item
    kept before it is <= threshold; the walk stops once `budget` items are kept. A zero
    vector has similarity 0 to everything (as scikit-learn's cosine_similarity says).

    Candidates go `block` at a time: one matmul against the kept set (in chunks, so no
    [N, N] or [block, N] matrix is made), then the block's own [block, block]
    similarities settle it in order. Float32 unless the embeddings are float64.
    """
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.dtype.kind not in "fiu" or 0 in embeddings.shape:
        raise JftError(f"embeddings: shape {embeddings.shape} ({embeddings.dtype}) is not "
                       "valid; give a non-empty [items, dimensions] array of numbers")
    dtype = np.float64 if embeddings.dtype == np.float64 else np.float32
    order = np.asarray(order)
    if order.ndim != 1 or order.dtype.kind not in "iu" or (order.size and not (
            0 <= order.min() and order.max() < len(embeddings))) \
            or len(np.unique(order)) != len(order):
        raise JftError(f"order: not valid; give distinct item indices from 0 to "
                       f"{len(embeddings) - 1}, highest priority first")
    if not (math.isfinite(threshold) and -1.0 <= threshold <= 1.0):
        raise JftError(f"threshold: {threshold!r} is not valid; give a cosine similarity "
                       "from -1 to 1")
    cap = len(order) if budget is None else min(_count(budget, "budget"), len(order))
    if isinstance(block, bool) or not isinstance(block, int | np.integer) or block < 1:
        raise JftError(f"block: {block!r} is not valid; give an integer >= 1")
    norms = np.sqrt(np.einsum("ij,ij->i", embeddings, embeddings, dtype=np.float64))
    if not np.isfinite(norms).all():
        raise JftError("embeddings: contains NaN or infinity; give finite numbers")
    norms = np.where(norms > 0, norms, 1.0).astype(dtype)
    kept = np.empty(cap, np.int64)
    kept_vectors = np.empty((cap, embeddings.shape[1]), dtype)
    count = 0
    chunk = max(1, _BLOCK_ELEMENTS // block)
    for start in range(0, len(order), block):
        if count == cap:
            break
        ids = order[start:start + block]
        vectors = embeddings[ids].astype(dtype) / norms[ids, None]
        alive = np.ones(len(ids), bool)
        for low in range(0, count, chunk):
            if not alive.any():
                break
            similar = vectors @ kept_vectors[low:min(low + chunk, count)].T
            alive &= similar.max(axis=1) <= threshold
        within = vectors @ vectors.T
        for i in np.flatnonzero(alive):
            # Rejected by an item kept earlier in this block.
            if not alive[i]:
                continue
            kept[count], kept_vectors[count] = ids[i], vectors[i]
            count += 1
            if count == cap:
                break
            alive[i + 1:] &= within[i, i + 1:] <= threshold
    return kept[:count]


def _labels(labels: np.ndarray, num_clusters: int) -> np.ndarray:
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int | np.integer) \
            or num_clusters < 1:
        raise JftError(f"num_clusters: {num_clusters!r} is not valid; give an integer >= 1")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or (labels.size and not (
            0 <= labels.min() and labels.max() < num_clusters)):
        raise JftError(f"labels: not valid; give one cluster id per item, integers from 0 "
                       f"to {num_clusters - 1}")
    return labels


def _scores(values: np.ndarray | None, n: int, name: str) -> np.ndarray:
    if values is None:
        return np.zeros(n)
    values = np.asarray(values)
    if values.shape != (n,) or values.dtype.kind not in "fiu" \
            or not np.isfinite(values).all():
        raise JftError(f"{name}: shape {values.shape} ({values.dtype}) is not valid; give "
                       f"{n} finite numbers, one per item")
    return values.astype(np.float64)


def _weights(weights: np.ndarray) -> np.ndarray:
    weights = np.asarray(weights)
    if weights.dtype.kind not in "fiu" or weights.ndim != 1 or weights.size == 0 \
            or not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise JftError("weights: not valid; give one finite weight >= 0 per cluster, not "
                       "all 0")
    return weights.astype(np.float64)


def _count(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise JftError(f"{name}: {value!r} is not valid; give an integer >= 0")
    return int(value)
