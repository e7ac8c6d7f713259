"""S2FT partial-backprop linears (pallas_kernels/s2ft_linear.py): forward and gradients
against jax.vjp of the references in interpret mode on CPU, the residuals and the
absence of a weight gradient, and lowering for TPU and CUDA."""

from __future__ import annotations

import contextlib
import functools
import io

import chex
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.ad_checkpoint import print_saved_residuals
from jax.experimental.pallas import tpu as pltpu

from jft.pallas_kernels import s2ft_linear as s2

SIDES = {
    "input": (s2.s2ft_input_side, s2.s2ft_input_side_reference),
    "output": (s2.s2ft_output_side, s2.s2ft_output_side_reference),
}
# Small tiles, so the tiny shapes below span several tiles along M, K and N.
SMALL_BLOCKS = {"tpu": dict(block_m=8, block_k=128, block_n=128),
                "gpu": dict(block_m=16, block_k=16, block_n=16)}
TRITON_CALL = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")


def _block_shape(side, k, n, c):
    return (c, n) if side == "input" else (k, c)


def _problem(seed, side, lead, k, n, c, dtype):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((*lead, k)), dtype)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)
    block = jnp.asarray(rng.standard_normal(_block_shape(side, k, n, c)) / np.sqrt(k),
                        jnp.float32)
    dy = jnp.asarray(rng.standard_normal((*lead, n)), dtype)
    return x, w, block, dy


def _close(actual, expected, dtype):
    # As an absolute tolerance: errors are judged against the output's scale, not per element.
    tolerance = 2e-5 if dtype == jnp.float32 else 2e-2
    scale = max(float(np.abs(np.asarray(expected, np.float64)).max()), 1e-6)
    chex.assert_trees_all_close(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                                atol=tolerance * scale, rtol=0)


def _check_against_reference(side, target, lead, k, n, c, dtype, seed=0, **options):
    kernel, reference = SIDES[side]
    x, w, block, dy = _problem(seed, side, lead, k, n, c, dtype)
    y_ref, vjp_ref = jax.vjp(reference, x, w, block)
    y, vjp = jax.vjp(functools.partial(kernel, interpret=True, target=target, **options),
                     x, w, block)
    (dx_ref, _, d_block_ref), (dx, dw, d_block) = vjp_ref(dy), vjp(dy)
    assert y.shape == (*lead, n) and y.dtype == dtype
    assert dx.dtype == dtype and d_block.dtype == block.dtype
    _close(y, y_ref, dtype)
    _close(dx, dx_ref, dtype)
    _close(d_block, d_block_ref, dtype)
    assert dw.shape == w.shape and not np.asarray(dw, np.float32).any()


# (leading dims, K, N, C, dtype): ragged M, K and N; C of 1, a few, and all of the
# block's side (K for the input side, N for the output side).
CASES = [
    ((37,), 300, 200, 1, jnp.float32),
    ((2, 9), 100, 72, 5, jnp.bfloat16),
    ((21,), 72, 100, "all", jnp.float32),
]
TPU_SIZES = {300: 256, 200: 384}  # several TPU tiles need multiples of 128


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("target", ["tpu", "gpu"])
@pytest.mark.parametrize("lead,k,n,c,dtype", CASES)
def test_fused_backward_matches_reference(side, target, lead, k, n, c, dtype):
    if target == "tpu":
        k, n = TPU_SIZES.get(k, k), TPU_SIZES.get(n, n)
    if c == "all":
        c = k if side == "input" else n
    _check_against_reference(side, target, lead, k, n, c, dtype, fuse=True,
                             **SMALL_BLOCKS[target])


@pytest.mark.parametrize("side", SIDES)
def test_xla_backward_matches_reference(side):
    _check_against_reference(side, "tpu", (13,), 40, 24, 6, jnp.float32, fuse=False)


@pytest.mark.parametrize("side", SIDES)
def test_fusion_rule(side, monkeypatch):
    """fuse=None fuses only while the partials cost less than the dy pass they save, and
    only where Pallas compiles (on CPU it would only interpret)."""
    kernel, _ = SIDES[side]
    k, n = 256, 256
    w = jnp.ones((k, n), jnp.bfloat16)

    def has_kernel(c, m=64):  # a new M per setting: the jit caches by shape
        x = jnp.ones((m, k), jnp.bfloat16)
        block = jnp.ones(_block_shape(side, k, n, c), jnp.float32)

        def loss(x, b):
            return kernel(x, w, b, interpret=True, target="tpu").sum()

        return "pallas_call" in str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, block))

    assert not has_kernel(8, m=32)  # on this CPU
    monkeypatch.setattr(s2.compat, "pallas_supported", lambda target=None: True)
    assert has_kernel(8)  # 8 * 8 < 2 * 512
    assert not has_kernel(200)


def _dot_shapes(jaxpr):
    """Output shapes of every dot_general in the jaxpr and its sub-jaxprs."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            shapes.extend(_dot_shapes(sub))
    return shapes


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("fuse", [True, False])
def test_no_weight_gradient_product(side, fuse):
    kernel, _ = SIDES[side]
    k, n, c = 256, 384, 5
    x, w, block, _ = _problem(1, side, (16,), k, n, c, jnp.float32)

    def loss(x, w, b):
        return kernel(x, w, b, interpret=True, target="tpu", fuse=fuse,
                      **SMALL_BLOCKS["tpu"]).sum()

    grad = jax.grad(loss, argnums=(0, 1, 2))
    shapes = _dot_shapes(jax.make_jaxpr(grad)(x, w, block).jaxpr)
    assert shapes and (k, n) not in shapes and (n, k) not in shapes
    assert not np.asarray(grad(x, w, block)[1]).any()


def _activation_residuals(function, *args):
    """Shapes of the saved residuals that are not the function's own arguments."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(function, *args)
    return [line.split()[0] for line in out.getvalue().splitlines()
            if line and "from the argument" not in line]


def test_residuals():
    """Input side: only x[:, :C] (not x); output side: x. Parameters are kept by
    reference and not counted."""
    lead, k, n, c = (2, 6), 64, 48, 5
    x, w, block, _ = _problem(2, "input", lead, k, n, c, jnp.float32)
    assert _activation_residuals(s2.s2ft_input_side, x, w, block) == [f"f32[12,{c}]"]
    x, w, block, _ = _problem(2, "output", lead, k, n, c, jnp.float32)
    assert _activation_residuals(s2.s2ft_output_side, x, w, block) == [f"f32[12,{k}]"]


def test_tpu_bodies_in_the_tpu_simulator(capfd):
    """The TPU interpreter models the block pipeline (it rejects non-consecutive output
    revisits), two cores splitting the parallel axes, races, and NaN-filled
    uninitialised memory: the partials' parked block indices and the grid semantics."""
    simulator = pltpu.InterpretParams(uninitialized_memory="nan", detect_races=True,
                                      num_cores_or_threads=2)
    for side in SIDES:
        kernel, reference = SIDES[side]
        x, w, block, dy = _problem(3, side, (37,), 256, 384, 5, jnp.float32)
        _, vjp_ref = jax.vjp(reference, x, w, block)
        _, vjp = jax.vjp(functools.partial(kernel, interpret=simulator, target="tpu", fuse=True,
                                           **SMALL_BLOCKS["tpu"]), x, w, block)
        (dx, _, d_block), (dx_ref, _, d_block_ref) = vjp(dy), vjp_ref(dy)
        _close(dx, dx_ref, jnp.float32)
        _close(d_block, d_block_ref, jnp.float32)
    assert "RACE DETECTED" not in capfd.readouterr().out


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("platform,target,custom_call", [
    ("tpu", "tpu", "tpu_custom_call"), ("cuda", "gpu", "__gpu$xla.gpu.triton")])
def test_lowers_for_real_backends(side, platform, target, custom_call):
    kernel, _ = SIDES[side]
    k, n, c = 512, 256, 64
    shape = jax.ShapeDtypeStruct
    args = (shape((2, 128, k), jnp.bfloat16), shape((k, n), jnp.bfloat16),
            shape(_block_shape(side, k, n, c), jnp.float32))
    forward = functools.partial(kernel, interpret=False, target=target, fuse=True)
    grad = jax.grad(lambda x, w, b: forward(x, w, b).astype(jnp.float32).sum(), argnums=(0, 2))
    lower = functools.partial(export.export, platforms=[platform], disabled_checks=[TRITON_CALL])
    assert lower(jax.jit(forward))(*args).mlir_module()  # XLA forward
    assert custom_call in lower(jax.jit(grad))(*args).mlir_module()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("side", SIDES)
def test_gpu_compiled_backward_matches_reference(side):
    kernel, reference = SIDES[side]
    x, w, block, dy = _problem(4, side, (300,), 512, 384, 40, jnp.bfloat16)
    _, vjp_ref = jax.vjp(reference, x, w, block)
    _, vjp = jax.vjp(functools.partial(kernel, fuse=True), x, w, block)
    (dx_ref, _, d_block_ref), (dx, _, d_block) = vjp_ref(dy), vjp(dy)
    _close(dx, dx_ref, jnp.bfloat16)
    _close(d_block, d_block_ref, jnp.bfloat16)
