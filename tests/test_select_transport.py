"""GOT-D's optimal transport (jft/select/transport.py) against independent references.

The references: POT's exact OT value `ot.emd2` and the entropic primal objective of
plans from POT's plain (not log-domain) Sinkhorn, both differentiated by central finite
differences along d_i = e_i - (1 - e_i) / (N - 1), the move of mass onto pool sample i
from all the others; and scipy's cdist for the cost matrix.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from jft.errors import JftError
from jft.select.transport import (
    Potentials,
    calibrated_gradients,
    cost_matrix,
    got_d_scores,
    pool_potentials,
)

ot = pytest.importorskip("ot")

N, M, D = 12, 5, 3


def small_problem(seed=0):
    """Random points, uniform masses 1/12 and 1/5: no proper sub-sums of the two mass
    vectors are equal (5|I| = 12|J| has no solution with |I| < 12), so every feasible
    basis is non-degenerate and the exact duals are unique up to a constant."""
    rng = np.random.default_rng(seed)
    pool = rng.normal(size=(N, D))
    target = rng.normal(size=(M, D)) + 0.5
    costs = cdist(pool, target)
    costs /= costs.max()  # the implementation's normalisation (by the maximum)
    return pool, target, costs, np.full(N, 1.0 / N), np.full(M, 1.0 / M)


def direction(i, count=N):
    d = np.full(count, -1.0 / (count - 1))
    d[i] = 1.0
    return d


def central_difference(value, a, step):
    return np.array([(value(a + step * direction(i)) - value(a - step * direction(i)))
                     / (2 * step) for i in range(len(a))])


def test_cost_matrix_matches_cdist_in_blocks(monkeypatch):
    import jft.select.transport as transport

    rng = np.random.default_rng(1)
    pool, target = rng.normal(size=(37, 6)) * 3, rng.normal(size=(9, 6))
    pool[5] = target[2]  # a zero distance: no NaN from a rounding negative under sqrt
    monkeypatch.setattr(transport, "_BLOCK_ELEMENTS", 50)  # 5 rows a block, 8 blocks
    for metric in ("euclidean", "sqeuclidean", "cosine"):
        costs = cost_matrix(pool, target, metric)
        assert costs.dtype == np.float64 and costs.shape == (37, 9)
        np.testing.assert_allclose(costs, cdist(pool, target, metric), rtol=1e-10,
                                   atol=1e-10)
    assert cost_matrix(pool, target)[5, 2] < 1e-6
    assert (cost_matrix(pool, target, "sqeuclidean") >= 0).all()


def test_emd_calibrated_gradient_is_the_directional_derivative_of_ot():
    pool, target, costs, a, b = small_problem()
    potentials = pool_potentials(pool, target, solver="emd")
    assert potentials.converged
    assert potentials.cost == pytest.approx(ot.emd2(a, b, costs), abs=1e-12)
    assert potentials.scale == pytest.approx(cdist(pool, target).max())
    assert abs(potentials.f.mean()) < 1e-12
    # A small step keeps the optimal basis, where the OT value is linear in the masses.
    expected = central_difference(lambda masses: ot.emd2(masses, b, costs), a, 1e-7)
    scores = calibrated_gradients(potentials.f)
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    assert np.ptp(expected) > 0.1  # the check has something to tell apart
    np.testing.assert_allclose(got_d_scores(pool, target, solver="emd"), scores, atol=1e-12)


@pytest.mark.parametrize("reg", [0.1, 0.02])
def test_sinkhorn_potentials_are_the_gradient_of_the_entropic_value(reg):
    pool, target, costs, a, b = small_problem(2)
    potentials = pool_potentials(pool, target, reg=reg, max_iterations=100_000,
                                 tolerance=1e-13)
    assert potentials.converged

    def entropic_value(masses):
        # POT's objective <P, C> + reg * sum P log P, at the plan of POT's plain Sinkhorn.
        plan = ot.sinkhorn(masses, b, costs, reg, method="sinkhorn", numItermax=100_000,
                           stopThr=1e-15)
        return float(np.sum(plan * costs) + reg * np.sum(plan * np.log(plan)))

    expected = central_difference(entropic_value, a, 1e-5)
    np.testing.assert_allclose(calibrated_gradients(potentials.f), expected, atol=1e-7)
    plan = ot.sinkhorn(a, b, costs, reg, method="sinkhorn", stopThr=1e-15,
                       numItermax=100_000)
    assert potentials.cost == pytest.approx(float(np.sum(plan * costs)), abs=1e-9)


def test_sinkhorn_approaches_emd_linearly_in_reg():
    """On the plan's support, f_i + g_j = C_ij + reg * log P_ij (0 for exact OT), so the
    entropic potentials differ from the exact ones by O(reg * log(1 / P_min)); here
    P_min >= 1/(N M)-ish, so 2 reg log(N M) bounds the pool side (seen: 1.0 to 1.4 reg
    on five seeds). The error must also shrink with reg, tenfold for a tenfold smaller
    reg, which a wrong sign or a misread potential (log_u without reg) would not do."""
    pool, target, _, _, _ = small_problem(3)
    exact = pool_potentials(pool, target, solver="emd")
    errors = []
    for reg in (1e-3, 1e-4):
        entropic = pool_potentials(pool, target, reg=reg, max_iterations=100_000)
        assert entropic.converged
        error = np.abs(entropic.f - exact.f).max()
        assert error < 2 * reg * np.log(N * M)
        scores = calibrated_gradients(entropic.f)
        np.testing.assert_allclose(scores, calibrated_gradients(exact.f),
                                   atol=4 * reg * np.log(N * M))
        assert np.abs(entropic.g - exact.g).max() < 2 * reg * np.log(N * M)
        errors.append(error)
    assert errors[1] < 0.2 * errors[0]


@pytest.mark.parametrize("solver", ["sinkhorn", "emd"])
def test_near_target_points_score_most_negative(solver):
    rng = np.random.default_rng(4)
    target = rng.normal(size=(30, 8))
    far = rng.normal(size=(150, 8)) + 4.0
    near = rng.normal(size=(8, 8)) * 0.5
    pool = np.concatenate([far[:70], near, far[70:]])
    planted = set(range(70, 78))
    scores = got_d_scores(pool, target, solver=solver)
    assert scores.shape == (158,)
    assert set(np.argsort(scores)[:8].tolist()) == planted
    assert scores[70:78].max() < 0 < np.median(scores)


@pytest.mark.parametrize("solver", ["sinkhorn", "emd"])
def test_scores_are_deterministic_and_permutation_invariant(solver):
    rng = np.random.default_rng(5)
    pool, target = rng.normal(size=(40, 4)), rng.normal(size=(7, 4)) + 1.0
    scores = got_d_scores(pool, target, solver=solver, metric="sqeuclidean")
    np.testing.assert_array_equal(scores, got_d_scores(pool, target, solver=solver,
                                                       metric="sqeuclidean"))
    order = rng.permutation(40)
    permuted = got_d_scores(pool[order], target, solver=solver, metric="sqeuclidean")
    unpermuted = np.empty_like(permuted)
    unpermuted[order] = permuted
    np.testing.assert_allclose(unpermuted, scores, atol=1e-10)
    assert np.ptp(scores) > 1e-3


def test_calibrated_gradients_formula():
    f = np.array([1.0, 2.0, 4.0])
    np.testing.assert_allclose(calibrated_gradients(f), [1 - 3, 2 - 2.5, 4 - 1.5])
    np.testing.assert_allclose(calibrated_gradients(f + 7.0), calibrated_gradients(f))
    with pytest.raises(JftError, match="N >= 2"):
        calibrated_gradients([1.0])


def test_sinkhorn_that_stops_early_warns_once():
    pool, target, _, _, _ = small_problem()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        potentials = pool_potentials(pool, target, reg=1e-3, max_iterations=1)
    assert isinstance(potentials, Potentials) and not potentials.converged
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "did not converge" in message and "\n" not in message


def one_line_error(call, *words):
    with pytest.raises(JftError) as raised:
        call()
    message = str(raised.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_bad_input_is_a_one_line_error():
    rng = np.random.default_rng(6)
    pool, target = rng.normal(size=(6, 3)), rng.normal(size=(4, 3))
    one_line_error(lambda: got_d_scores(pool, rng.normal(size=(4, 2))), "target_embeddings",
                   "dimension")
    one_line_error(lambda: got_d_scores(np.zeros((0, 3)), target), "pool_embeddings",
                   "non-empty")
    one_line_error(lambda: got_d_scores(pool[:1], target), "pool_embeddings", "at least 2")
    one_line_error(lambda: got_d_scores(pool, np.zeros((4, 0))), "target_embeddings")
    one_line_error(lambda: got_d_scores(pool[0], target), "pool_embeddings", "2-D")
    with_nan = pool.copy()
    with_nan[3, 1] = np.nan
    one_line_error(lambda: got_d_scores(with_nan, target), "pool_embeddings", "row 3", "NaN")
    one_line_error(lambda: got_d_scores(pool, target, metric="manhattan"), "metric",
                   "euclidean, sqeuclidean, cosine")
    one_line_error(lambda: got_d_scores(pool, target, solver="greenkhorn"), "solver",
                   "sinkhorn, emd")
    for reg in (0.0, -1.0, float("nan")):
        one_line_error(lambda reg=reg: got_d_scores(pool, target, reg=reg), "reg", "> 0")
    one_line_error(lambda: pool_potentials(pool, target, max_iterations=0), "max_iterations")
    one_line_error(lambda: pool_potentials(pool, target, tolerance=0), "tolerance")
    one_line_error(lambda: cost_matrix(np.zeros((2, 3)), target, "cosine"), "pool",
                   "zero vector")
    one_line_error(lambda: cost_matrix(pool, target, "hamming"), "metric")


def test_missing_pot_is_named(monkeypatch):
    rng = np.random.default_rng(7)
    monkeypatch.setitem(sys.modules, "ot", None)  # makes `import ot` raise ImportError
    one_line_error(lambda: got_d_scores(rng.normal(size=(3, 2)), rng.normal(size=(2, 2))),
                   "got-d needs POT", "pip install POT")
