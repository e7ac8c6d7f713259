"""GOT-D's optimal transport: which pool samples pull the pool towards the target.

GOT-D (Kang et al., ICLR 2024, "Get more for less") scores each candidate of a pool S by
how the optimal transport distance OT(S, R) to a target set R changes when a little
probability mass moves onto that candidate. Both sets are empirical distributions with
uniform masses on their embeddings (a = 1/N on the pool, b = 1/M on the target), and the
cost is a distance between embeddings (Euclidean by default: Kantorovich-Rubinstein).

By duality, OT(a, b) = max_{f, g} <f, a> + <g, b> over f_i + g_j <= C_ij, so the
gradient of the transport cost with respect to the pool masses is the pool-side dual
potential f. Masses must keep summing to one, so f is only defined up to a constant;
the calibrated gradient of LAVA (Just et al., 2023),

    grad_i = f_i - (1 / (N - 1)) * sum_{j != i} f_j,

is the directional derivative of OT along d_i = e_i - (1 - e_i) / (N - 1): mass epsilon
moved onto sample i, taken equally from all the others. It does not depend on that
constant.

Direction: a NEGATIVE score means that weighting the sample more brings the pool closer
to the target. GOT-D selects the most negative scores (ascending order).

The solver is POT (the optimal transport library, `import ot`), imported lazily:
entropic OT with the log-domain stabilised Sinkhorn (`ot.sinkhorn(...,
method='sinkhorn_log')`, the paper's choice, as it scales) or exact OT with the network
simplex (`ot.emd`, for small problems and reference checks).

The cost matrix is divided by its maximum before solving, so `reg` is relative to the
largest pool-target distance (scale-free), and the potentials f, g and the transport
cost are reported in those normalised units (multiply by `Potentials.scale` to get the
embedding's units back).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from jft.errors import JftError

METRICS = ("euclidean", "sqeuclidean", "cosine")
SOLVERS = ("sinkhorn", "emd")
# Rows of the [N, M] cost matrix computed at once: the block's temporaries stay near
# 32 MiB of float64 whatever N is.
_BLOCK_ELEMENTS = 1 << 22


def _require_pot():
    try:
        import ot
    except ImportError:
        raise JftError("got-d needs POT (the optimal transport library): pip install POT") \
            from None
    return ot


def _embeddings(name: str, array) -> np.ndarray:
    """`array` as a finite, non-empty float64 [rows, D] matrix, or a one-line JftError."""
    try:
        values = np.asarray(array, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise JftError(f"{name}: expected a numeric 2-D array [rows, D] ({error})") from None
    if values.ndim != 2:
        raise JftError(f"{name}: expected a 2-D array [rows, D], got shape {values.shape}")
    if values.shape[0] == 0 or values.shape[1] == 0:
        raise JftError(f"{name}: expected a non-empty array [rows, D] with rows >= 1 and "
                       f"D >= 1, got shape {values.shape}")
    if not np.isfinite(values).all():
        bad = int(np.argwhere(~np.isfinite(values))[0, 0])
        raise JftError(f"{name}: row {bad} has NaN or infinite values; embeddings must be "
                       "finite")
    return values


def _pair(pool, target, pool_name="pool", target_name="target"):
    pool = _embeddings(pool_name, pool)
    target = _embeddings(target_name, target)
    if pool.shape[1] != target.shape[1]:
        raise JftError(f"{target_name}: embedding dimension {target.shape[1]} differs from "
                       f"{pool_name}'s {pool.shape[1]}; both must be [rows, D] with the same D")
    return pool, target


def _check_metric(metric) -> str:
    if metric not in METRICS:
        raise JftError(f"metric: {metric!r} is not one of {', '.join(METRICS)}")
    return metric


def _unit_rows(name: str, values: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(values, axis=1)
    if (norms == 0).any():
        bad = int(np.argmax(norms == 0))
        raise JftError(f"{name}: row {bad} is the zero vector, which has no cosine distance; "
                       "use metric euclidean or sqeuclidean")
    return values / norms[:, None]


def cost_matrix(pool, target, metric: str = "euclidean") -> np.ndarray:
    """The [N, M] float64 distances between pool rows [N, D] and target rows [M, D].

    `metric`: "euclidean" (||x - y||), "sqeuclidean" (||x - y||^2) or "cosine"
    (1 - cos(x, y), in [0, 2]). Computed in row blocks with the matmul form
    ||x||^2 + ||y||^2 - 2 x.y, so no [N, M, D] tensor is ever built; the rounding
    negatives of the squared distance are clipped at 0.
    """
    metric = _check_metric(metric)
    pool, target = _pair(pool, target)
    if metric == "cosine":
        pool, target = _unit_rows("pool", pool), _unit_rows("target", target)
    rows, columns = pool.shape[0], target.shape[0]
    target_t = np.ascontiguousarray(target.T)
    target_sq = np.einsum("ij,ij->i", target, target)
    out = np.empty((rows, columns), dtype=np.float64)
    block = max(1, _BLOCK_ELEMENTS // max(columns, 1))
    for start in range(0, rows, block):
        x = pool[start:start + block]
        dots = x @ target_t
        if metric == "cosine":
            np.clip(1.0 - dots, 0.0, 2.0, out=out[start:start + block])
            continue
        dots *= -2.0
        dots += np.einsum("ij,ij->i", x, x)[:, None]
        dots += target_sq[None, :]
        if metric == "sqeuclidean":
            np.maximum(dots, 0.0, out=out[start:start + block])
        else:
            np.maximum(dots, 0.0, out=dots)
            np.sqrt(dots, out=out[start:start + block])
    return out


@dataclass(frozen=True)
class Potentials:
    """The dual potentials of OT(pool, target) with uniform masses, in normalised units.

    f [N]: the pool's potential (the gradient of the OT value w.r.t. the pool masses);
    g [M]: the target's. Centred so that mean(f) = 0 (g shifted by the same constant, so
    f_i + g_j still bounds the cost). cost: the transport cost <P, C> of the plan found
    (without the entropy term), on the normalised cost matrix. scale: what the cost
    matrix was divided by (its maximum; 1 when every distance is 0). converged: Sinkhorn
    reached `tolerance` on the target marginal, or the network simplex reached optimality.
    """

    f: np.ndarray
    g: np.ndarray
    cost: float
    converged: bool
    scale: float = 1.0


def _check_options(solver, reg, max_iterations, tolerance):
    if solver not in SOLVERS:
        raise JftError(f"solver: {solver!r} is not one of {', '.join(SOLVERS)}")
    if isinstance(reg, bool) or not isinstance(reg, (int, float, np.floating, np.integer)) \
            or not np.isfinite(reg) or reg <= 0:
        raise JftError(f"reg: {reg!r} is not valid; the entropic regularisation must be a "
                       "finite number > 0 (relative to the largest distance)")
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, (int, np.integer)) \
            or max_iterations < 1:
        raise JftError(f"max_iterations: {max_iterations!r} is not valid; expected an "
                       "integer >= 1")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float, np.floating)) \
            or not np.isfinite(tolerance) or tolerance <= 0:
        raise JftError(f"tolerance: {tolerance!r} is not valid; expected a finite number > 0")


def pool_potentials(pool, target, *, metric: str = "euclidean", solver: str = "sinkhorn",
                    reg: float = 0.05, max_iterations: int = 1000,
                    tolerance: float = 1e-9) -> Potentials:
    """Dual potentials of OT between the pool [N, D] and the target [M, D] embeddings.

    Masses are uniform (1/N, 1/M) and the cost is `cost_matrix(pool, target, metric)`
    divided by its maximum, so `reg` is scale-free: it is relative to the largest
    pool-target distance, and f, g and cost come back in those normalised units.

    solver="sinkhorn": entropic OT, min <P, C> + reg * sum P log P (POT's objective),
    solved by the log-domain stabilised Sinkhorn (`ot.sinkhorn(method='sinkhorn_log')`),
    which stays exact for small `reg`. f = reg * log_u and g = reg * log_v are then the
    gradients of that regularised value w.r.t. the masses (up to a shared constant). It
    stops when the target marginal's error (L2) is below `tolerance`, checked every 10
    iterations, or after `max_iterations`; a run that did not converge warns (one line)
    and returns what it has, with converged=False.

    solver="emd": exact OT by POT's network simplex (`ot.emd`), for small problems: its
    pivot cap is max(max_iterations, 100000, 10 * N * M) and `reg`/`tolerance` are not
    used. Without degenerate ties the duals are unique up to a constant.

    Both are centred the same way (mean of f is 0), so the two are comparable.
    """
    metric = _check_metric(metric)
    _check_options(solver, reg, max_iterations, tolerance)
    pool, target = _pair(pool, target)
    ot = _require_pot()
    costs = cost_matrix(pool, target, metric)
    scale = float(costs.max())
    if scale > 0:
        costs /= scale
    else:
        scale = 1.0
    rows, columns = costs.shape
    a = np.full(rows, 1.0 / rows)
    b = np.full(columns, 1.0 / columns)
    if solver == "emd":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # POT's own warning; ours is below
            plan, log = ot.emd(a, b, costs, numItermax=max(int(max_iterations), 100_000,
                                                           10 * rows * columns), log=True)
        f, g = np.asarray(log["u"], np.float64), np.asarray(log["v"], np.float64)
        converged = int(log["result_code"]) == 1
        if not converged:
            warnings.warn(f"got-d: the exact OT solver (ot.emd) stopped before optimality: "
                          f"{log['warning']}", stacklevel=2)
    else:
        # POT also returns exp(log_u), which overflows harmlessly for a small reg.
        with np.errstate(over="ignore"):
            plan, log = ot.sinkhorn(a, b, costs, float(reg), method="sinkhorn_log",
                                    numItermax=int(max_iterations), stopThr=float(tolerance),
                                    warn=False, log=True)
        f = float(reg) * np.asarray(log["log_u"], np.float64)
        g = float(reg) * np.asarray(log["log_v"], np.float64)
        error = float(log["err"][-1]) if len(log["err"]) else float("inf")
        converged = error < tolerance
        if not converged:
            warnings.warn(f"got-d: Sinkhorn did not converge in {max_iterations} iterations "
                          f"(marginal error {error:.2e} > tolerance {tolerance:g}); raise "
                          "the regularisation (--reg) or solve exactly (--solver emd)",
                          stacklevel=2)
    plan = np.asarray(plan, np.float64)
    shift = float(f.mean())
    return Potentials(f=f - shift, g=g + shift, cost=float(np.sum(plan * costs)),
                      converged=bool(converged), scale=scale)


def calibrated_gradients(f) -> np.ndarray:
    """LAVA's calibrated gradients f_i - (sum_j f_j - f_i) / (N - 1), float64 [N].

    The directional derivative of the OT value when mass moves onto sample i equally
    from all the N - 1 others; unchanged by adding a constant to f.
    """
    f = np.asarray(f, dtype=np.float64)
    if f.ndim != 1 or f.shape[0] < 2:
        raise JftError(f"f: expected a 1-D potential of N >= 2 pool samples, got shape "
                       f"{f.shape}")
    if not np.isfinite(f).all():
        raise JftError("f: the potential has NaN or infinite values")
    count = f.shape[0]
    return f - (f.sum() - f) / (count - 1)


def got_d_scores(pool_embeddings, target_embeddings, *, metric: str = "euclidean",
                 solver: str = "sinkhorn", reg: float = 0.05, max_iterations: int = 1000,
                 tolerance: float = 1e-9) -> np.ndarray:
    """GOT-D's score of each pool sample [N]: the calibrated gradient of OT(pool, target)
    with respect to its probability mass (normalised cost units, see `pool_potentials`).

    Lower is better: the most NEGATIVE scores are the samples whose extra weight most
    reduces the distance to the target, and GOT-D selects them (sort ascending).
    The pool needs N >= 2 samples.
    """
    pool, target = _pair(pool_embeddings, target_embeddings, "pool_embeddings",
                         "target_embeddings")
    if pool.shape[0] < 2:
        raise JftError(f"pool_embeddings: GOT-D needs at least 2 pool samples, got "
                       f"{pool.shape[0]}")
    potentials = pool_potentials(pool, target, metric=metric, solver=solver, reg=reg,
                                 max_iterations=max_iterations, tolerance=tolerance)
    return calibrated_gradients(potentials.f)
