"""k-means, silhouette and k choice against scikit-learn; kMQ budgets and sampling, the
iterative re-weighting and the Repr Filter dedup against plain references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score
from sklearn.metrics import silhouette_score as sklearn_silhouette

from jft.errors import JftError
from jft.select.diversity import (
    cluster_budgets,
    greedy_dedup,
    kmq_select,
    sample_within_clusters,
    update_cluster_weights,
    weighted_cluster_budgets,
)
from jft.select.kmeans import choose_k, kmeans, silhouette_score


def blobs(n=400, features=8, centers=4, seed=0, spread=1.0):
    x, y = make_blobs(n, features, centers=centers, cluster_std=spread, random_state=seed)
    return x.astype(np.float32), y


def uniform(n=300, features=5, seed=1):
    return np.random.default_rng(seed).uniform(size=(n, features)).astype(np.float32)


def sklearn_lloyd(x, init, tol, max_iter):
    return KMeans(n_clusters=len(init), init=init, n_init=1, algorithm="lloyd", tol=tol,
                  max_iter=max_iter).fit(x)


@pytest.mark.parametrize("data, k, tol, max_iter", [
    (blobs()[0], 4, 1e-4, 300),
    (blobs(spread=4.0)[0], 6, 1e-4, 300),
    (uniform(), 5, 1e-4, 300),
    (uniform(), 5, 0.0, 300),  # only strict convergence stops it
    (uniform(), 5, 1e-4, 2),  # stopped early: the final re-assignment must match too
])
def test_kmeans_matches_sklearn_from_the_same_init(data, k, tol, max_iter):
    init = data[np.random.default_rng(k).choice(len(data), k, replace=False)]
    ours = kmeans(data, k, init=init, tolerance=tol, iterations=max_iter)
    theirs = sklearn_lloyd(data, init, tol, max_iter)
    np.testing.assert_array_equal(ours.labels, theirs.labels_)
    np.testing.assert_allclose(ours.centers, theirs.cluster_centers_, rtol=1e-4, atol=1e-4)
    assert ours.inertia == pytest.approx(theirs.inertia_, rel=1e-4)
    assert ours.iterations == theirs.n_iter_
    assert ours.labels.dtype == np.int32 and ours.centers.shape == (k, data.shape[1])


def test_kmeans_reseeds_an_empty_cluster_like_sklearn():
    x, _ = blobs()
    init = x[:4].copy()
    init[3] = 1000.0  # nothing is near it, so it is empty after the first assignment
    ours = kmeans(x, 4, init=init)
    theirs = sklearn_lloyd(x, init, 1e-4, 300)
    np.testing.assert_array_equal(ours.labels, theirs.labels_)
    np.testing.assert_allclose(ours.centers, theirs.cluster_centers_, rtol=1e-4, atol=1e-4)
    assert len(np.unique(ours.labels)) == 4


def test_kmeans_plus_plus_finds_separated_blobs():
    x, y = blobs(n=500, centers=5, seed=3, spread=0.5)
    ours = kmeans(x, 5, seed=0)
    best = KMeans(n_clusters=5, n_init=10, random_state=0).fit(x)
    assert adjusted_rand_score(ours.labels, best.labels_) == 1.0
    assert adjusted_rand_score(ours.labels, y) == 1.0
    assert ours.inertia <= best.inertia_ * 1.01


def test_kmeans_is_deterministic_per_seed():
    x = uniform(n=400, features=3)
    first = kmeans(x, 8, seed=5)
    again = kmeans(x, 8, seed=5)
    np.testing.assert_array_equal(first.labels, again.labels)
    np.testing.assert_array_equal(first.centers, again.centers)
    others = [kmeans(x, 8, seed=seed).labels for seed in range(4)]
    assert any(not np.array_equal(others[0], labels) for labels in others[1:])


def test_silhouette_matches_sklearn():
    x, y = blobs(n=300, spread=3.0)
    assert silhouette_score(x, y, sample_size=None) == pytest.approx(
        sklearn_silhouette(x, y), abs=1e-5)
    # A singleton cluster scores 0 for its point; labels need not be 0..K-1.
    labels = np.where(np.arange(len(y)) == 7, 10, y * 3)
    assert silhouette_score(x, labels, sample_size=None) == pytest.approx(
        sklearn_silhouette(x, labels), abs=1e-5)
    # Subsampled: the same points as scikit-learn's for the same seed.
    assert silhouette_score(x, y, sample_size=60, seed=4) == pytest.approx(
        sklearn_silhouette(x, y, sample_size=60, random_state=4), abs=1e-5)


def test_choose_k_finds_the_number_of_blobs():
    x, _ = blobs(n=300, centers=4, seed=7, spread=0.6)
    k, scores = choose_k(x, range(2, 9), seed=0)
    assert k == 4
    assert sorted(scores) == list(range(2, 9))
    assert scores[4] == max(scores.values())


@pytest.mark.parametrize("call", [
    lambda: kmeans(uniform(n=3), 4),
    lambda: kmeans(np.zeros((5,)), 2),
    lambda: kmeans(uniform(), 2, init=np.zeros((3, 5))),
    lambda: kmeans(np.full((4, 2), np.nan), 2),
    lambda: silhouette_score(uniform(n=10), np.zeros(10, int)),
    lambda: choose_k(uniform(n=10), [1, 2]),
])
def test_kmeans_bad_input_is_a_jft_error(call):
    with pytest.raises(JftError):
        call()


def labels_with_sizes(sizes, seed=0):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return np.random.default_rng(seed).permutation(labels)


SIZES = [50, 3, 0, 17, 1, 29, 8]


@pytest.mark.parametrize("budget", [0, 1, 5, 12, 40, 77, 107, 108, 500])
def test_proportional_budgets(budget):
    labels = labels_with_sizes(SIZES)
    shares = cluster_budgets(labels, budget, num_clusters=len(SIZES))
    sizes = np.array(SIZES)
    assert shares.sum() == min(budget, len(labels))
    assert (shares <= sizes).all()
    exact = sizes / len(labels) * min(budget, len(labels))
    assert (np.abs(shares - exact) < 1).all()


@pytest.mark.parametrize("budget", [0, 1, 5, 12, 40, 77, 107, 108, 500])
def test_uniform_budgets_cap_and_spread_the_rest(budget):
    labels = labels_with_sizes(SIZES)
    shares = cluster_budgets(labels, budget, num_clusters=len(SIZES), allocation="uniform")
    sizes = np.array(SIZES)
    assert shares.sum() == min(budget, len(labels))
    assert (shares <= sizes).all()
    # Water-filling: a cluster below its size is within 1 of the largest share.
    below = shares < sizes
    if below.any():
        assert shares[below].min() >= shares.max() - 1


def test_budget_bad_input_is_a_jft_error():
    with pytest.raises(JftError, match="allocation"):
        cluster_budgets(np.zeros(4, int), 2, num_clusters=1, allocation="random")
    with pytest.raises(JftError, match="labels"):
        cluster_budgets(np.array([0, 3]), 2, num_clusters=2)
    with pytest.raises(JftError, match="budgets"):
        sample_within_clusters(np.zeros(4, int), None, np.array([5]), seed=0)


def test_sampling_within_clusters():
    rng = np.random.default_rng(0)
    labels = labels_with_sizes([30, 20, 10])
    quality = rng.normal(size=len(labels))
    exclude = rng.random(len(labels)) < 0.3
    budgets = np.array([8, 5, 3])
    picked = sample_within_clusters(labels, quality, budgets, seed=1, exclude=exclude)
    assert len(np.unique(picked)) == len(picked) == budgets.sum()
    assert not exclude[picked].any()
    np.testing.assert_array_equal(np.bincount(labels[picked], minlength=3), budgets)
    assert (np.diff(labels[picked]) >= 0).all()  # grouped by cluster
    again = sample_within_clusters(labels, quality, budgets, seed=1, exclude=exclude)
    np.testing.assert_array_equal(picked, again)
    other = sample_within_clusters(labels, quality, budgets, seed=2, exclude=exclude)
    assert not np.array_equal(picked, other)
    # Nearly zero temperature: each cluster's best items, best first.
    greedy = sample_within_clusters(labels, quality, budgets, temperature=1e-6, seed=3,
                                    exclude=exclude)
    expected = []
    for cluster, count in enumerate(budgets):
        members = np.flatnonzero((labels == cluster) & ~exclude)
        expected.extend(members[np.argsort(-quality[members])][:count])
    np.testing.assert_array_equal(greedy, expected)


def test_gumbel_top_k_is_sequential_sampling_without_replacement():
    quality = np.array([0.0, 1.0, -0.5, 2.0])
    temperature, take, runs = 1.5, 2, 4000
    p = np.exp(quality / temperature)
    p /= p.sum()
    exact = np.zeros(4)
    for first, second in itertools.permutations(range(4), take):
        chance = p[first] * p[second] / (1 - p[first])
        exact[[first, second]] += chance
    counts = np.zeros(4)
    labels = np.zeros(4, int)
    for seed in range(runs):
        picked = sample_within_clusters(labels, quality, np.array([take]),
                                        temperature=temperature, seed=seed)
        counts[picked] += 1
    frequency = counts / runs
    error = np.sqrt(exact * (1 - exact) / runs)
    assert np.all(np.abs(frequency - exact) < 4 * error), (frequency, exact)


def test_kmq_select_takes_the_budget_without_repeats():
    labels = labels_with_sizes(SIZES, seed=2)
    quality = np.random.default_rng(2).normal(size=len(labels))
    for allocation in ("proportional", "uniform"):
        picked = kmq_select(labels, quality, 40, temperature=0.5, seed=0,
                            allocation=allocation)
        assert len(np.unique(picked)) == 40
        shares = cluster_budgets(labels, 40, num_clusters=len(SIZES), allocation=allocation)
        np.testing.assert_array_equal(np.bincount(labels[picked], minlength=len(SIZES)),
                                      shares)


def test_update_cluster_weights_matches_the_formula():
    weights = np.array([0.1, 0.2, 0.3, 0.4])
    labels = np.array([0, 0, 1, 1, 1, 3, 3, 2])
    scored = np.array([0, 1, 2, 4, 5])  # cluster 2 has nothing scored
    gaps = np.array([1.0, 3.0, 0.5, 1.5, -2.0])
    s = np.array([2.0, 1.0, 0.0, -2.0])
    s[2] = (2.0 + 1.0 - 2.0) / 3
    softmax = np.exp(s) / np.exp(s).sum()
    expected = weights * softmax / (weights * softmax).sum()
    np.testing.assert_allclose(update_cluster_weights(weights, labels, scored, gaps),
                               expected, rtol=1e-12)
    np.testing.assert_allclose(
        update_cluster_weights(weights, labels, np.array([], int), np.array([])), weights)


def test_weighted_cluster_budgets():
    weights = np.array([0.7, 0.1, 0.1, 0.1, 0.0])
    available = np.array([3, 50, 0, 40, 10])
    for budget in (0, 10, 60, 93, 200):
        shares = weighted_cluster_budgets(weights, available, budget, seed=4)
        assert shares.sum() == min(budget, available.sum())
        assert (shares <= available).all()
        np.testing.assert_array_equal(
            shares, weighted_cluster_budgets(weights, available, budget, seed=4))
    # Cluster 0 overflows and gives its surplus to the others; 4 has no weight but room.
    assert weighted_cluster_budgets(weights, available, 30, seed=0)[[0, 4]].tolist() == [3, 0]
    assert weighted_cluster_budgets(weights, available, 103, seed=0)[4] == 10


def brute_force_dedup(embeddings, order, threshold, budget):
    """Deita's Repr Filter as written: compare each candidate with everything kept."""
    kept = []
    for i in order:
        if budget is not None and len(kept) == budget:
            break
        a = embeddings[i].astype(np.float64)
        similar = False
        for j in kept:
            b = embeddings[j].astype(np.float64)
            norms = np.linalg.norm(a) * np.linalg.norm(b)
            cosine = a @ b / norms if norms > 0 else 0.0
            if cosine > threshold:
                similar = True
                break
        if not similar:
            kept.append(int(i))
    return np.array(kept, dtype=np.int64)


@pytest.fixture(scope="module")
def pool():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(200, 12))
    copies = base[rng.choice(200, 100)] + 0.1 * rng.normal(size=(100, 12))
    scaled = 3.0 * base[rng.choice(200, 20)]  # same direction, other length
    embeddings = np.concatenate([base, copies, scaled, np.zeros((2, 12))])
    return embeddings.astype(np.float32), rng.permutation(len(embeddings))


@pytest.mark.parametrize("block", [1, 7, 1024])
@pytest.mark.parametrize("budget", [None, 60])
def test_greedy_dedup_matches_brute_force(pool, block, budget):
    embeddings, order = pool
    expected = brute_force_dedup(embeddings, order, 0.9, budget)
    assert len(expected) < len(order) and (budget is None or len(expected) == budget)
    kept = greedy_dedup(embeddings, order, threshold=0.9, budget=budget, block=block)
    np.testing.assert_array_equal(kept, expected)
    # A part of the pool, in its own order, with another threshold.
    subset = order[::3]
    np.testing.assert_array_equal(
        greedy_dedup(embeddings, subset, threshold=0.5, budget=budget, block=block),
        brute_force_dedup(embeddings, subset, 0.5, budget))


def test_greedy_dedup_bad_input_is_a_jft_error(pool):
    embeddings, order = pool
    with pytest.raises(JftError, match="order"):
        greedy_dedup(embeddings, np.concatenate([order, order[:1]]))
    with pytest.raises(JftError, match="threshold"):
        greedy_dedup(embeddings, order, threshold=1.5)
    with pytest.raises(JftError, match="budget"):
        greedy_dedup(embeddings, order, budget=-1)
