"""k-means (k-means++ then Lloyd) in JAX, the silhouette score, and k chosen by silhouette.

Built to follow scikit-learn's `KMeans(algorithm="lloyd")` step for step, so that the
same init gives the same clustering: the data is centred first, the tolerance is scaled
by the mean feature variance, a pass whose labels did not change stops the loop
("strict convergence"), and empty clusters are re-seeded the way scikit-learn does it.
Distances are computed a block of rows at a time, so a 100k x 896 pool never needs
more than a [rows, k] temporary besides the (centred copy of the) data.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jft.errors import JftError

# Elements of one block's [rows, k] distance matrix (16 MiB of float32).
_BLOCK_ELEMENTS = 1 << 22
# Compiled shapes hold a power of two >= k centers (at least this many), the spare ones
# masked out, so that trying several k (choose_k) compiles a few programs, not one each.
_MIN_SLOTS = 8
# Accelerators may run float32 matmuls in TF32 or bfloat16 by default; assignments near a
# boundary would then flip, so distances always use full float32.
_PRECISION = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, eq=False)
class KMeansResult:
    """centers [k, D] float32, labels [N] int32, inertia (sum of squared distances of the
    points to their centers) and the number of Lloyd iterations run."""

    centers: np.ndarray
    labels: np.ndarray
    inertia: float
    iterations: int


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, iterations: int = 300,
           tolerance: float = 1e-4, init: np.ndarray | None = None) -> KMeansResult:
    """Clusters the rows of x [N, D] into k clusters.

    Starts from `init` [k, D] when given, else from greedy k-means++ drawn with numpy's
    generator seeded by `seed` (scikit-learn's variant: 2 + log k candidates per center,
    the one that lowers the potential most wins). Lloyd iterations stop once the summed
    squared center shift is at most `tolerance` times the mean per-feature variance of x
    (scikit-learn's `tol`), when an iteration changes no label, or after `iterations`.
    Deterministic per seed. Computed in float32 (x is cast), centers come back [k, D].
    """
    x = _points(x, "x")
    n, d = x.shape
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n:
        raise JftError(f"k: {k!r} is not valid; give an integer from 1 to the number of "
                       f"points ({n})")
    if isinstance(iterations, bool) or not isinstance(iterations, int | np.integer) \
            or iterations < 1:
        raise JftError(f"iterations: {iterations!r} is not valid; give an integer >= 1")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise JftError(f"tolerance: {tolerance!r} is not valid; give a number >= 0")
    # Centring, as scikit-learn does, keeps |c|^2 - 2 x.c accurate in float32 when the
    # data sits far from the origin; the variance is taken in float64 for the same reason.
    mean = x.mean(axis=0, dtype=np.float64)
    tol = float(np.mean(x.var(axis=0, dtype=np.float64)) * tolerance)
    xc = jnp.asarray((x - mean).astype(np.float32))
    slots = max(_MIN_SLOTS, 1 << (k - 1).bit_length())
    if init is None:
        centers = _kmeans_plus_plus(xc, seed, k, slots)
    else:
        init = _points(init, "init")
        if init.shape != (k, d):
            raise JftError(f"init: shape {init.shape} is not valid; give the k initial "
                           f"centers as a [{k}, {d}] array")
        centers = np.zeros((slots, d), np.float32)
        centers[:k] = init - mean
    rows = max(1, min(n, _BLOCK_ELEMENTS // slots))
    centers, labels, inertia, steps = _lloyd(xc, jnp.asarray(centers), jnp.int32(k),
                                             jnp.float32(tol), jnp.int32(iterations),
                                             rows=rows)
    centers = np.asarray(centers[:k], np.float64) + mean
    return KMeansResult(centers=centers.astype(np.float32),
                        labels=np.asarray(labels, np.int32), inertia=float(inertia),
                        iterations=int(steps))


def silhouette_score(x: np.ndarray, labels: np.ndarray, *, sample_size: int | None = 5000,
                     seed: int = 0) -> float:
    """Mean silhouette coefficient (Euclidean) of the labelling of x [N, D] by labels [N].

    With `sample_size`, only a random subset of that many points is scored, drawn as
    scikit-learn draws it for the same `random_state` (a permutation's first points), so
    the two agree. Computed in float64 a block of rows at a time: memory is
    O(rows x sample), never sample x sample.
    """
    x = _points(x, "x", None)
    labels = _labels(labels, len(x))
    if sample_size is not None:
        if isinstance(sample_size, bool) or not isinstance(sample_size, int | np.integer) \
                or sample_size < 2:
            raise JftError(f"sample_size: {sample_size!r} is not valid; give an integer >= 2 "
                           "or None for every point")
        keep = np.random.RandomState(seed).permutation(len(x))[:sample_size]
        x, labels = x[keep], labels[keep]
    x = x.astype(np.float64)  # after sampling: a float64 copy of a whole pool is big
    _, labels, freqs = np.unique(labels, return_inverse=True, return_counts=True)
    if not 2 <= len(freqs) <= len(x) - 1:
        raise JftError(f"labels: {len(freqs)} distinct clusters among {len(x)} points; the "
                       "silhouette needs from 2 to the number of points - 1")
    squares = np.einsum("ij,ij->i", x, x)
    one_hot = np.zeros((len(x), len(freqs)))
    one_hot[np.arange(len(x)), labels] = 1.0
    rows = max(1, _BLOCK_ELEMENTS // len(x))
    scores = np.empty(len(x))
    for start in range(0, len(x), rows):
        stop = min(start + rows, len(x))
        block = np.arange(start, stop)
        squared = squares[block, None] + squares[None, :] - 2.0 * (x[block] @ x.T)
        squared[np.arange(len(block)), block] = 0.0
        per_cluster = np.sqrt(np.maximum(squared, 0.0)) @ one_hot  # [rows, clusters] sums
        own = labels[block]
        intra = per_cluster[np.arange(len(block)), own]
        per_cluster[np.arange(len(block)), own] = np.inf
        inter = (per_cluster / freqs).min(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            intra = intra / (freqs[own] - 1)
            # A point alone in its cluster scores 0 (0/0 here), as in scikit-learn.
            scores[block] = np.nan_to_num((inter - intra) / np.maximum(intra, inter))
    return float(scores.mean())


def choose_k(x: np.ndarray, candidates: Sequence[int], *, seed: int = 0,
             sample_size: int | None = 5000) -> tuple[int, dict[int, float]]:
    """The candidate k whose k-means clustering of x [N, D] has the highest silhouette
    (how Diversify and Conquer picks k), and every candidate's score; ties go to the
    smaller k."""
    x = _points(x, "x")
    candidates = list(candidates)
    ks = sorted({k for k in candidates if isinstance(k, int | np.integer)})
    if not ks or len(ks) != len(set(candidates)) or ks[0] < 2 or ks[-1] > len(x) - 1:
        raise JftError(f"candidates: {list(candidates)!r} is not valid; give one or more "
                       f"numbers of clusters from 2 to the number of points - 1 ({len(x) - 1})")
    scores = {}
    for k in ks:
        labels = kmeans(x, k, seed=seed).labels
        # Only with many duplicate points can k-means leave a single cluster; that
        # clustering separates nothing, so it gets the worst silhouette.
        if len(np.unique(labels)) < 2:
            scores[k] = -1.0
        else:
            scores[k] = silhouette_score(x, labels, sample_size=sample_size, seed=seed)
    return max(ks, key=lambda k: (scores[k], -k)), scores


def _points(x: np.ndarray, name: str, dtype: type | None = np.float32) -> np.ndarray:
    """x checked as a non-empty finite [points, features] array, cast to dtype if given."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0 or x.dtype.kind not in "fiu":
        raise JftError(f"{name}: shape {x.shape} ({x.dtype}) is not valid; give a non-empty "
                       "[points, features] array of numbers")
    if dtype is not None:
        x = x.astype(dtype, copy=False)
    if not np.isfinite(x).all():
        raise JftError(f"{name}: contains NaN or infinity; give finite numbers")
    return x


def _labels(labels: np.ndarray, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        raise JftError(f"labels: shape {labels.shape} ({labels.dtype}) is not valid; give "
                       f"one integer cluster id per point ({n})")
    return labels


def _kmeans_plus_plus(x: jax.Array, seed: int, k: int, slots: int) -> jax.Array:
    """Greedy k-means++ (scikit-learn's `_kmeans_plusplus`): [slots, D] initial centers,
    the first k chosen, the rest zero."""
    trials = 2 + int(math.log(k))
    # numpy draws the randomness up front: compiling jax.random's generator into the loop
    # costs more than the whole init on a CPU.
    rng = np.random.default_rng(seed)
    first = jnp.int32(rng.integers(x.shape[0]))
    uniforms = np.ones((slots, 2 + int(math.log(slots))), np.float32)
    uniforms[:k, :trials] = rng.random((k, trials), dtype=np.float32)
    return _plus_plus(x, jnp.sum(x * x, axis=1), first, jnp.asarray(uniforms), jnp.int32(k),
                      jnp.int32(trials))


@jax.jit
def _plus_plus(x: jax.Array, squares: jax.Array, first: jax.Array, uniforms: jax.Array,
               k: jax.Array, trials: jax.Array) -> jax.Array:
    def to_points(ids):  # [len(ids), N] squared distances from points ids to every point
        dots = jnp.dot(x[ids], x.T, precision=_PRECISION)
        return jnp.maximum(squares[ids, None] + squares[None, :] - 2.0 * dots, 0.0)

    centers = jnp.zeros((uniforms.shape[0], x.shape[1]), x.dtype).at[0].set(x[first])
    spare = jnp.arange(uniforms.shape[1]) >= trials  # candidate columns beyond `trials`
    closest = to_points(first[None])[0]

    def add_center(c, state):
        centers, closest = state
        # Candidates drawn with probability proportional to the squared distance to the
        # nearest chosen center (D^2 sampling); searchsorted on the running sum draws them.
        running = jnp.cumsum(closest)
        ids = jnp.searchsorted(running, uniforms[c] * running[-1], method="compare_all")
        ids = jnp.minimum(ids, x.shape[0] - 1)
        after = jnp.minimum(closest[None, :], to_points(ids))
        best = jnp.argmin(jnp.where(spare, jnp.inf, after.sum(axis=1)))
        return centers.at[c].set(x[ids[best]]), after[best]

    centers, _ = lax.fori_loop(1, k, add_center, (centers, closest))
    return centers


def _assign(x: jax.Array, squares: jax.Array, centers: jax.Array, live: jax.Array,
            rows: int) -> tuple[jax.Array, jax.Array]:
    """labels [N] int32 of the nearest live center and squared distances [N] to it.

    Blocks of `rows` points; the last block is shifted back to end at N, so it overlaps
    the one before (recomputing a few rows) instead of padding a copy of x.
    """
    n = x.shape[0]
    center_squares = jnp.where(live, jnp.sum(centers * centers, axis=1), jnp.inf)

    def block(i, state):
        labels, distances = state
        start = jnp.minimum(i * rows, n - rows)
        xb = lax.dynamic_slice_in_dim(x, start, rows)
        # |x|^2 is the same for every center, so the argmin skips it (as scikit-learn).
        partial_sq = center_squares[None, :] - 2.0 * jnp.dot(xb, centers.T,
                                                             precision=_PRECISION)
        nearest = jnp.argmin(partial_sq, axis=1).astype(jnp.int32)
        to_nearest = lax.dynamic_slice_in_dim(squares, start, rows) + partial_sq.min(axis=1)
        return (lax.dynamic_update_slice_in_dim(labels, nearest, start, 0),
                lax.dynamic_update_slice_in_dim(distances, jnp.maximum(to_nearest, 0.0),
                                                start, 0))

    state = (jnp.zeros(n, jnp.int32), jnp.zeros(n, x.dtype))
    return lax.fori_loop(0, -(-n // rows), block, state)


def _inertia(x: jax.Array, centers: jax.Array, labels: jax.Array, rows: int) -> jax.Array:
    """Sum of |x - center|^2, exactly (not via the expanded form), blockwise."""
    n = x.shape[0]

    def block(i, total):
        start = jnp.minimum(i * rows, n - rows)
        xb = lax.dynamic_slice_in_dim(x, start, rows)
        lb = lax.dynamic_slice_in_dim(labels, start, rows)
        fresh = start + jnp.arange(rows) >= i * rows  # rows the shifted last block repeats
        return total + jnp.sum(jnp.where(fresh[:, None], (xb - centers[lb]) ** 2, 0.0))

    return lax.fori_loop(0, -(-n // rows), block, jnp.zeros((), x.dtype))


def _relocate_empty(x: jax.Array, labels: jax.Array, distances: jax.Array, sums: jax.Array,
                    counts: jax.Array, live: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Re-seeds each empty cluster with one of the points farthest from their centers.

    scikit-learn (`_relocate_empty_clusters_dense`) gives the j-th empty cluster the j-th
    farthest point and moves that point's weight out of its old cluster's sum; so do we.
    Its farthest points come from argpartition, unordered among themselves, so with two or
    more empty clusters at once which one gets which point may differ; the set is the same.
    """
    empty = (counts == 0) & live

    def relocate(state):
        sums, counts = state
        # Farthest first; there are at most k <= N empty clusters.
        _, farthest = lax.top_k(distances, min(sums.shape[0], x.shape[0]))
        donor = farthest[jnp.maximum(jnp.cumsum(empty) - 1, 0)]  # [k]; used where empty
        moved = empty.astype(x.dtype)
        sums = sums.at[labels[donor]].add(-x[donor] * moved[:, None])
        counts = counts.at[labels[donor]].add(-moved)
        return jnp.where(empty[:, None], x[donor], sums), jnp.where(empty, 1.0, counts)

    return lax.cond(empty.any(), relocate, lambda state: state, (sums, counts))


@partial(jax.jit, static_argnames=("rows",))
def _lloyd(x: jax.Array, centers: jax.Array, k: jax.Array, tol: jax.Array,
           max_steps: jax.Array, *, rows: int) -> tuple[jax.Array, ...]:
    """Lloyd iterations from centers [slots, D], of which the first k are used:
    (centers, labels, inertia, iterations). The spare ones never win a point, so they
    stay as they are and never move."""
    slots = centers.shape[0]
    live = jnp.arange(slots) < k
    squares = jnp.sum(x * x, axis=1)

    def step(state):
        steps, centers, labels_old, _, _ = state
        labels, distances = _assign(x, squares, centers, live, rows)
        sums = jax.ops.segment_sum(x, labels, num_segments=slots)
        counts = jax.ops.segment_sum(jnp.ones_like(distances), labels, num_segments=slots)
        sums, counts = _relocate_empty(x, labels, distances, sums, counts, live)
        # A cluster can only stay empty if relocation took its last point; scikit-learn
        # then leaves the sum (zero) as the center, and so do we.
        new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None],
                        jnp.where(live[:, None], sums, centers))
        strict = jnp.array_equal(labels, labels_old)
        done = strict | (jnp.sum((new - centers) ** 2) <= tol)
        return steps + 1, new, labels, strict, done

    labels = jnp.full(x.shape[0], -1, jnp.int32)
    state = (jnp.int32(0), centers, labels, jnp.array(False), jnp.array(False))
    steps, centers, labels, strict, _ = lax.while_loop(
        lambda state: (state[0] < max_steps) & ~state[4], step, state)
    # Unless the last pass changed no label, its labels belong to the centers before the
    # update: assign once more so labels and centers agree (scikit-learn does the same).
    labels = lax.cond(strict, lambda: labels, lambda: _assign(x, squares, centers, live, rows)[0])
    return centers, labels, _inertia(x, centers, labels, rows), steps
