"""The per-tensor merge maths (`jft.merging.tensors`): exact parity with HF PEFT's
`merge_utils` for its deterministic methods, DARE's statistics and reproducibility, and
breadcrumbs / DELLA against NumPy transcriptions of mergekit's rules plus hand-worked
examples."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from peft.utils import merge_utils

from jft.errors import JftError
from jft.merging.tensors import (
    MERGE_METHODS,
    RANDOM_METHODS,
    breadcrumbs_mask,
    della_mask,
    disjoint_merge,
    elect_sign,
    magnitude_mask,
    merge_tensors,
)

WEIGHTS = [0.7, -0.4, 1.3]  # PEFT takes any real weights, a negative one included
# Magnitudes ranked ascending: i0 0.1, i5 0.2, i3 0.3, i7 0.4, i2 0.5, i9 0.6, i4 0.7,
# i8 0.8, i1 0.9, i6 1.0.
HAND = np.array([[0.1, -0.9, 0.5, 0.3, -0.7, 0.2, 1.0, -0.4, 0.8, 0.6]], dtype=np.float32)


def _task_vectors(shape=(6, 8, 16), count=3, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(count)]


def _peft(function, tensors, weights, **kwargs):
    """PEFT's merge of the same float32 arrays, as NumPy."""
    with warnings.catch_warnings():  # PEFT warns that density 1 prunes nothing
        warnings.simplefilter("ignore", UserWarning)
        out = function([torch.from_numpy(t) for t in tensors],
                       torch.tensor(weights, dtype=torch.float32), **kwargs)
    return out.numpy()


# ------------------------------------------------------------------ PEFT parity


def test_linear_matches_peft_task_arithmetic():
    tensors = _task_vectors()
    ours = merge_tensors("linear", tensors, WEIGHTS)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, _peft(merge_utils.task_arithmetic, tensors, WEIGHTS),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("density", [0.2, 0.57, 1.0])  # 0.57·768 truncates like PEFT's int()
def test_magnitude_prune_matches_peft(density):
    tensors = _task_vectors()
    ours = merge_tensors("magnitude_prune", tensors, WEIGHTS, density=density)
    theirs = _peft(merge_utils.magnitude_prune, tensors, WEIGHTS, density=density)
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("majority_sign", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.2, 0.57, 1.0])
def test_ties_matches_peft_with_both_sign_methods(density, majority_sign):
    tensors = _task_vectors()
    ours = merge_tensors("ties", tensors, WEIGHTS, density=density,
                         majority_sign=majority_sign)
    theirs = _peft(merge_utils.ties, tensors, WEIGHTS, density=density,
                   majority_sign_method=majority_sign)
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=1e-6)


def test_ties_elects_signs_before_weighting_like_peft():
    # Column 0: unweighted sum 3 − 2 > 0, so only τ1 agrees: 0.5·3 / 1. Column 1: both
    # negative agree: (0.5·−1 + −1·−2) / 2 = 0.75 (the negative weight flips τ2's value
    # but not its vote, and the count, not the weights, divides).
    tensors = [np.array([3.0, -1.0], np.float32), np.array([-2.0, -2.0], np.float32)]
    ours = merge_tensors("ties", tensors, [0.5, -1.0])
    np.testing.assert_array_equal(ours, [1.5, 0.75])
    np.testing.assert_allclose(_peft(merge_utils.ties, tensors, [0.5, -1.0], density=1.0),
                               ours, atol=1e-6)


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_elect_sign_and_disjoint_merge_match_peft(method):
    stack = np.stack(_task_vectors(count=4))
    stack[:, 0, 0, :4] = 0.0  # zeros never agree
    agree = torch.from_numpy(np.sign(stack) == elect_sign(stack, method))
    theirs = merge_utils.calculate_majority_sign_mask(torch.from_numpy(stack), method)
    assert torch.equal(agree, theirs)
    np.testing.assert_allclose(disjoint_merge(stack, elect_sign(stack, method)),
                               merge_utils.disjoint_merge(torch.from_numpy(stack), theirs),
                               atol=1e-6)


def test_magnitude_mask_keeps_int_density_times_numel_largest():
    mask = magnitude_mask(HAND, 0.3)
    np.testing.assert_array_equal(np.flatnonzero(mask), [1, 6, 8])
    assert not magnitude_mask(HAND, 0.05).any()  # int(0.5) = 0, as in PEFT


# ------------------------------------------------------------------ DARE


def test_dare_keeps_a_density_fraction_rescaled_by_one_over_density():
    x = np.random.default_rng(1).standard_normal(10_000).astype(np.float32)
    density = 0.3
    out = merge_tensors("dare_linear", [x], [1.0], density=density, seed=5)
    kept = out != 0
    sigma = np.sqrt(density * (1 - density) / x.size)
    assert abs(kept.mean() - density) < 3 * sigma
    expected = (x.astype(np.float64) / density).astype(np.float32)
    np.testing.assert_array_equal(out[kept], expected[kept])
    # The draw is one uniform per entry from default_rng([seed, index]), kept below density.
    np.testing.assert_array_equal(kept, np.random.default_rng([5, 0]).random(x.shape) < density)
    no_rescale = merge_tensors("dare_linear", [x], [1.0], density=density, seed=5,
                               rescale=False)
    np.testing.assert_array_equal(no_rescale, np.where(kept, x, 0))


@pytest.mark.parametrize("majority_sign", ["total", "frequency"])
def test_dare_at_density_one_equals_peft(majority_sign):
    tensors = _task_vectors()
    np.testing.assert_allclose(merge_tensors("dare_linear", tensors, WEIGHTS),
                               _peft(merge_utils.dare_linear, tensors, WEIGHTS, density=1.0),
                               atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(
        merge_tensors("dare_ties", tensors, WEIGHTS, majority_sign=majority_sign),
        _peft(merge_utils.dare_ties, tensors, WEIGHTS, density=1.0,
              majority_sign_method=majority_sign), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("majority_sign", ["total", "frequency"])
def test_dare_ties_is_peft_sign_election_on_the_dropped_tensors(majority_sign):
    tensors, density, seed = _task_vectors(), 0.4, 9
    dropped = [t * (np.random.default_rng([seed, i]).random(t.shape) < density) / density
               for i, t in enumerate(tensors)]
    stack = torch.from_numpy(np.stack(dropped).astype(np.float32))
    agree = merge_utils.calculate_majority_sign_mask(stack, majority_sign)
    weighted = stack * torch.tensor(WEIGHTS).view(-1, 1, 1, 1)
    theirs = merge_utils.disjoint_merge(weighted, agree).numpy()
    ours = merge_tensors("dare_ties", tensors, WEIGHTS, density=density, seed=seed,
                         majority_sign=majority_sign)
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_random_methods_are_reproducible_per_seed_and_input(method):
    a, b = _task_vectors(count=2)
    kwargs = {"density": 0.5, "epsilon": 0.1}
    first = merge_tensors(method, [a, b], [1.0, 0.5], seed=3, **kwargs)
    np.testing.assert_array_equal(first, merge_tensors(method, [a, b], [1.0, 0.5], seed=3,
                                                       **kwargs))
    assert not np.array_equal(first, merge_tensors(method, [a, b], [1.0, 0.5], seed=4,
                                                   **kwargs))
    # Input 0's mask depends on the seed and its index only, not on the other inputs.
    alone = merge_tensors("della_linear" if "della" in method else "dare_linear", [a], [1.0],
                          seed=3, **kwargs)
    with_other = merge_tensors("della_linear" if "della" in method else "dare_linear",
                               [a, b], [1.0, 0.0], seed=3, **kwargs)
    np.testing.assert_array_equal(alone, with_other)


# ------------------------------------------------------------------ breadcrumbs


def _mergekit_outliers(x, density, gamma):
    """mergekit's magnitude_outliers transcribed (its slice end written n − n_top)."""
    n = x.size
    target, n_top = int(density * n), int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    indices = np.argsort(np.abs(x).ravel(), kind="stable")
    mask = np.zeros(n)
    mask[indices[n_bot:n - n_top]] = 1
    return x * mask.reshape(x.shape)


@pytest.mark.parametrize("density,gamma,kept", [
    (0.5, 0.1, [1, 2, 4, 8, 9]),   # drop 1.0 and the four smallest
    (0.3, 0.2, [4, 8, 9]),         # drop 0.9, 1.0 and the five smallest
    (0.5, 0.6, [0, 2, 3, 5, 7]),   # gamma >= 1 − density: only 5 tops go, density honoured
    (0.5, 0.01, [1, 4, 6, 8, 9]),  # int(0.1) = 0 outliers: plain top-5 (mergekit keeps none)
    (1.0, 0.1, list(range(10))),
])
def test_breadcrumbs_mask_on_a_hand_example(density, gamma, kept):
    np.testing.assert_array_equal(np.flatnonzero(breadcrumbs_mask(HAND, density, gamma)), kept)


@pytest.mark.parametrize("density,gamma", [(0.3, 0.01), (0.5, 0.1), (0.9, 0.2)])
def test_breadcrumbs_match_the_mergekit_transcription(density, gamma):
    tensors = _task_vectors()
    weighted = np.stack([w * _mergekit_outliers(t.astype(np.float64), density, gamma)
                         for w, t in zip(WEIGHTS, tensors, strict=True)])
    np.testing.assert_allclose(
        merge_tensors("breadcrumbs", tensors, WEIGHTS, density=density, gamma=gamma),
        weighted.sum(0), atol=1e-6)
    majority = np.where(weighted.sum(0) >= 0, 1, -1)  # mergekit's "sum", on weighted deltas
    np.testing.assert_allclose(
        merge_tensors("breadcrumbs_ties", tensors, WEIGHTS, density=density, gamma=gamma),
        (weighted * (np.sign(weighted) == majority)).sum(0), atol=1e-6)
    assert (breadcrumbs_mask(tensors[0], density, gamma).sum()
            == int(density * tensors[0].size))


# ------------------------------------------------------------------ DELLA


def _della_probs(x, density, epsilon):
    """DELLA's keep probabilities, ranked along the last axis."""
    rows = np.abs(x).reshape(-1, x.shape[-1])
    ranks = np.empty_like(rows)
    for row, magnitudes in enumerate(rows):
        ranks[row, np.argsort(magnitudes, kind="stable")] = np.arange(rows.shape[1])
    return (density - epsilon + 2 * epsilon * ranks / (rows.shape[1] - 1)).reshape(x.shape)


def test_della_probabilities_on_a_hand_example():
    _, probs = della_mask(HAND, 0.5, 0.1, np.random.default_rng(0))
    rank = {0: 0, 5: 1, 3: 2, 7: 3, 2: 4, 9: 5, 4: 6, 8: 7, 1: 8, 6: 9}
    expected = [0.4 + 0.2 * rank[i] / 9 for i in range(10)]
    np.testing.assert_allclose(probs[0], expected, atol=1e-12)
    assert probs[0, 0] == pytest.approx(0.4) and probs[0, 6] == pytest.approx(0.6)


def test_della_ranks_each_row_of_the_last_axis_and_keeps_at_those_rates():
    x = np.random.default_rng(2).standard_normal((2, 3, 7)).astype(np.float32)
    _, probs = della_mask(x, 0.5, 0.15, np.random.default_rng(0))
    np.testing.assert_allclose(probs, _della_probs(x, 0.5, 0.15), atol=1e-12)
    # Empirically: 4000 rows of 5, each column's keep rate within 4 sigma of its p.
    big = np.tile(np.array([0.1, 0.2, 0.3, 0.4, 0.5]), (4000, 1))
    mask, probs = della_mask(big, 0.5, 0.2, np.random.default_rng(1))
    p = probs[0]
    np.testing.assert_allclose(p, [0.3, 0.4, 0.5, 0.6, 0.7])
    assert np.all(np.abs(mask.mean(0) - p) < 4 * np.sqrt(p * (1 - p) / 4000))


@pytest.mark.parametrize("majority_sign", ["total", "frequency"])
def test_della_matches_the_mergekit_transcription(majority_sign):
    tensors, density, epsilon, seed = _task_vectors(), 0.4, 0.15, 11
    kept = []
    for i, t in enumerate(tensors):
        probs = _della_probs(t.astype(np.float64), density, epsilon)
        mask = np.random.default_rng([seed, i]).random(t.shape) < probs
        kept.append(np.where(mask, t / probs, 0.0))  # DELLA's rescale by 1/p
    weighted = np.stack(kept) * np.array(WEIGHTS).reshape(-1, 1, 1, 1)
    kwargs = {"density": density, "epsilon": epsilon, "seed": seed}
    np.testing.assert_allclose(merge_tensors("della_linear", tensors, WEIGHTS, **kwargs),
                               weighted.sum(0), atol=1e-6)
    score = weighted.sum(0) if majority_sign == "total" else np.sign(weighted).sum(0)
    agree = np.sign(weighted) == np.where(score >= 0, 1, -1)
    divisor = (np.array(WEIGHTS).reshape(-1, 1, 1, 1) * agree).sum(0)
    divisor[divisor == 0] = 1
    np.testing.assert_allclose(
        merge_tensors("della", tensors, WEIGHTS, majority_sign=majority_sign, **kwargs),
        (weighted * agree).sum(0) / divisor, atol=1e-5)


# ------------------------------------------------------------------ shapes and errors


@pytest.mark.parametrize("method", MERGE_METHODS)
@pytest.mark.parametrize("shape", [(), (1,), (2, 3, 4)])
def test_every_method_returns_float32_of_the_input_shape(method, shape):
    tensors = [np.full(shape, 0.5, np.float32), np.full(shape, -0.25, np.float32)]
    out = merge_tensors(method, tensors, [1.0, 2.0], density=0.5, epsilon=0.1)
    assert out.dtype == np.float32 and out.shape == shape and np.all(np.isfinite(out))


def test_density_one_without_sparsification_is_task_arithmetic():
    tensors = _task_vectors()
    linear = merge_tensors("linear", tensors, WEIGHTS)
    for method in ("magnitude_prune", "dare_linear", "breadcrumbs", "della_linear"):
        np.testing.assert_allclose(merge_tensors(method, tensors, WEIGHTS), linear, atol=1e-6)


@pytest.mark.parametrize("kwargs,field", [
    ({"density": 0.0}, "density"),
    ({"density": 1.5}, "density"),
    ({"density": float("nan")}, "density"),
    ({"weights": [1.0]}, "weights"),
    ({"weights": [1.0, 2.0, 3.0]}, "weights"),
    ({"tensors": [np.zeros((2, 3)), np.zeros((3, 2))]}, "tensors"),
    ({"tensors": []}, "tensors"),
    ({"method": "slerp"}, "method"),
    ({"majority_sign": "mass"}, "majority_sign"),
    ({"gamma": -0.1}, "gamma"),
    ({"seed": -1}, "seed"),
    ({"method": "della", "density": 0.5, "epsilon": 0.6}, "epsilon"),
])
def test_bad_input_raises_jft_error_naming_the_field(kwargs, field):
    call = {"method": "ties", "tensors": [np.zeros((2, 3)), np.ones((2, 3))],
            "weights": [1.0, 1.0], **kwargs}
    with pytest.raises(JftError, match=field):
        merge_tensors(call.pop("method"), call.pop("tensors"), call.pop("weights"), **call)
