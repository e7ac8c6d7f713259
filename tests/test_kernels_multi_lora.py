"""Multi-adapter LoRA kernels (pallas_kernels/multi_lora.py) against their references and
an independent per-row loop, in interpret mode on CPU; lowering for TPU and CUDA."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu

from jft.pallas_kernels import multi_lora as ml

TARGETS = ("tpu", "gpu")
# Small blocks so that even tiny shapes span several row blocks and group boundaries.
SMALL_BLOCKS = {"tpu": dict(block_m=8), "gpu": dict(block_m=16, block_k=16, block_n=16)}
TRITON_CALL = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")


def _adapters(seed, m, k, n, rank, num_adapters, dtype):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    a = jnp.asarray(rng.standard_normal((num_adapters, k, rank)) / np.sqrt(k), dtype)
    b = jnp.asarray(rng.standard_normal((num_adapters, rank, n)) / np.sqrt(rank), dtype)
    scales = jnp.asarray(rng.uniform(0.5, 2.0, num_adapters), jnp.float32)
    return rng, x, a, b, scales


def _naive(x, adapter_ids, a, b, scales):
    """Row by row in float64: the definition, sharing no code with the module."""
    x, a, b = (np.asarray(v, np.float64) for v in (x, a, b))
    out = np.zeros((x.shape[0], b.shape[2]))
    for row, adapter in enumerate(np.asarray(adapter_ids)):
        if adapter >= 0:
            out[row] = float(scales[adapter]) * (x[row] @ a[adapter]) @ b[adapter]
    return out


def _close(actual, expected, dtype):
    """Max error relative to the largest expected value: f32 tight, bf16 at its
    precision (the rank-r intermediate is rounded to bf16 by design)."""
    # As an absolute tolerance: errors are judged against the output's scale, not per element.
    tolerance = 2e-5 if dtype == jnp.float32 else 3e-2
    scale = max(float(np.abs(np.asarray(expected, np.float64)).max()), 1e-6)
    chex.assert_trees_all_close(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                                atol=tolerance * scale, rtol=0)


# (M, K, N, r, G, dtype): ragged M/K/N, ranks 1/8/64, fp32 and bf16, G up to 16.
CASES = [
    (37, 100, 72, 8, 5, jnp.float32),
    (21, 130, 40, 1, 3, jnp.bfloat16),
    (19, 64, 136, 64, 16, jnp.float32),
]


def _ids(rng, m, num_adapters):
    """Ids with -1 rows, adapter 1 never used, and the rest drawn at random."""
    ids = rng.integers(-1, num_adapters, m)
    ids[ids == 1] = 0
    ids[:3] = [-1, num_adapters - 1, -1]
    return jnp.asarray(ids, jnp.int32)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("m,k,n,rank,num_adapters,dtype", CASES)
def test_gathered_matches_reference_and_naive(target, m, k, n, rank, num_adapters, dtype):
    rng, x, a, b, scales = _adapters(1, m, k, n, rank, num_adapters, dtype)
    ids = _ids(rng, m, num_adapters)
    got = ml.gathered_lora(x, ids, a, b, scales, interpret=True, target=target,
                           **({"block_m": 8} if target == "tpu" else {}))
    reference = ml.gathered_lora_reference(x, ids, a, b, scales)
    assert got.shape == (m, n) and got.dtype == dtype
    _close(reference, _naive(x, ids, a, b, scales), dtype)
    _close(got, reference, dtype)
    _close(got, _naive(x, ids, a, b, scales), dtype)
    assert not np.asarray(got, np.float32)[np.asarray(ids) < 0].any()


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("m,k,n,rank,num_adapters,dtype", CASES)
def test_grouped_matches_reference_and_naive(target, m, k, n, rank, num_adapters, dtype):
    rng, x, a, b, scales = _adapters(2, m, k, n, rank, num_adapters, dtype)
    # Uneven sizes: an empty group first, one mid-way (G > 3), 4 no-adapter rows last.
    sizes = np.zeros(num_adapters, np.int64)
    sizes[1] = 9
    sizes[2:] = rng.multinomial(m - 9 - 4, np.ones(num_adapters - 2) / (num_adapters - 2))
    if num_adapters > 3:
        sizes[3] += sizes[2]
        sizes[2] = 0
    group_sizes = jnp.asarray(sizes, jnp.int32)
    row_ids = np.repeat(np.arange(num_adapters), sizes)
    row_ids = jnp.asarray(np.concatenate([row_ids, -np.ones(m - len(row_ids))]), jnp.int32)

    got = ml.grouped_lora(x, group_sizes, a, b, scales, interpret=True, target=target,
                          **SMALL_BLOCKS[target])
    reference = ml.grouped_lora_reference(x, group_sizes, a, b, scales)
    assert got.shape == (m, n) and got.dtype == dtype
    _close(reference, _naive(x, row_ids, a, b, scales), dtype)
    _close(got, reference, dtype)
    _close(got, _naive(x, row_ids, a, b, scales), dtype)
    assert not np.asarray(got, np.float32)[m - 4:].any()


@pytest.mark.parametrize("target", TARGETS)
def test_many_adapters(target):
    """G = 512, most adapters unused: the visit tables outnumber the row blocks."""
    m, k, n, rank, num_adapters = 64, 32, 16, 4, 512
    rng, x, a, b, scales = _adapters(6, m, k, n, rank, num_adapters, jnp.float32)
    ids = _ids(rng, m, num_adapters)
    gathered = ml.gathered_lora(x, ids, a, b, scales, interpret=True, target=target)
    _close(gathered, _naive(x, ids, a, b, scales), jnp.float32)
    order, sizes = ml.sort_by_adapter(ids, num_adapters)
    grouped = ml.grouped_lora(x[order], sizes, a, b, scales, interpret=True, target=target,
                              block_m=16)
    _close(grouped, _naive(x[order], ids[order], a, b, scales), jnp.float32)


def test_empty_batch():
    x = jnp.zeros((0, 32), jnp.float32)
    a, b = jnp.zeros((3, 32, 4)), jnp.zeros((3, 4, 16))
    empty = jnp.zeros((0,), jnp.int32)
    assert ml.gathered_lora(x, empty, a, b, jnp.ones(3)).shape == (0, 16)
    assert ml.grouped_lora(x, jnp.zeros((3,), jnp.int32), a, b, jnp.ones(3)).shape == (0, 16)


def test_sort_by_adapter_round_trip():
    ids = jnp.asarray([3, -1, 0, 3, 2, -1, 0, 0], jnp.int32)
    order, sizes = ml.sort_by_adapter(ids, 5)
    np.testing.assert_array_equal(sizes, [3, 0, 1, 2, 0])
    np.testing.assert_array_equal(ids[order], [0, 0, 0, 2, 3, 3, -1, -1])
    np.testing.assert_array_equal(order[:3], [2, 6, 7])  # stable within a group
    rows = jnp.arange(8)[:, None] * 10.0 + jnp.arange(3)
    back = jnp.zeros_like(rows).at[order].set(rows[order])
    np.testing.assert_array_equal(back, rows)


def test_sorted_grouped_equals_gathered():
    """The prefill path (sort, grouped, scatter back) gives the decode path's deltas."""
    m, k, n, rank, num_adapters = 29, 48, 40, 8, 6
    rng, x, a, b, scales = _adapters(3, m, k, n, rank, num_adapters, jnp.float32)
    ids = _ids(rng, m, num_adapters)
    order, sizes = ml.sort_by_adapter(ids, num_adapters)
    sorted_delta = ml.grouped_lora(x[order], sizes, a, b, scales, interpret=True,
                                   target="gpu", block_m=16)
    delta = jnp.zeros_like(sorted_delta).at[order].set(sorted_delta)
    _close(delta, ml.gathered_lora_reference(x, ids, a, b, scales), jnp.float32)


def test_tpu_bodies_in_the_tpu_simulator(capfd):
    """The TPU interpreter models the block pipeline (it rejects non-consecutive output
    revisits), two cores splitting the parallel axes, races, and NaN-filled
    uninitialised memory: the grouped kernels' visit order and the resident blocks."""
    simulator = pltpu.InterpretParams(uninitialized_memory="nan", detect_races=True,
                                      num_cores_or_threads=2)
    m, k, n, rank, num_adapters = 21, 256, 256, 8, 5
    rng, x, a, b, scales = _adapters(4, m, k, n, rank, num_adapters, jnp.float32)
    ids = _ids(rng, m, num_adapters)
    gathered = ml.gathered_lora(x, ids, a, b, scales, interpret=simulator, target="tpu",
                                block_m=8)
    _close(gathered, _naive(x, ids, a, b, scales), jnp.float32)
    order, sizes = ml.sort_by_adapter(ids, num_adapters)
    grouped = ml.grouped_lora(x[order], sizes, a, b, scales, interpret=simulator,
                              target="tpu", block_m=8, block_k=128, block_n=128)
    _close(grouped, ml.grouped_lora_reference(x[order], sizes, a, b, scales), jnp.float32)
    assert "RACE DETECTED" not in capfd.readouterr().out


def _realistic_args(rank=16, num_adapters=8):
    m, k, n = 256, 512, 256
    shape = jax.ShapeDtypeStruct
    return (shape((m, k), jnp.bfloat16), shape((num_adapters, k, rank), jnp.bfloat16),
            shape((num_adapters, rank, n), jnp.bfloat16), shape((num_adapters,), jnp.float32))


@pytest.mark.parametrize("kernel,per_row", [(ml.gathered_lora, True), (ml.grouped_lora, False)])
@pytest.mark.parametrize("platform,target,custom_call", [
    ("tpu", "tpu", "tpu_custom_call"), ("cuda", "gpu", "__gpu$xla.gpu.triton")])
def test_kernels_lower_for_real_backends(kernel, per_row, platform, target, custom_call):
    x, a, b, scales = _realistic_args()
    ids = jax.ShapeDtypeStruct((x.shape[0] if per_row else a.shape[0],), jnp.int32)
    function = jax.jit(functools.partial(kernel, interpret=False, target=target))
    exported = export.export(function, platforms=[platform], disabled_checks=[TRITON_CALL])(
        x, ids, a, b, scales)
    assert custom_call in exported.mlir_module()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_gpu_compiled_kernels_match_references():
    m, k, n, rank, num_adapters = 300, 512, 384, 16, 8
    rng, x, a, b, scales = _adapters(5, m, k, n, rank, num_adapters, jnp.bfloat16)
    ids = _ids(rng, m, num_adapters)
    _close(ml.gathered_lora(x, ids, a, b, scales),
           ml.gathered_lora_reference(x, ids, a, b, scales), jnp.bfloat16)
    order, sizes = ml.sort_by_adapter(ids, num_adapters)
    _close(ml.grouped_lora(x[order], sizes, a, b, scales),
           ml.grouped_lora_reference(x[order], sizes, a, b, scales), jnp.bfloat16)
