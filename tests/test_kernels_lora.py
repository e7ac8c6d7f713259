"""The fused LoRA linear (pallas_kernels/lora_linear.py): both kernel bodies in interpret
mode against the XLA reference (outputs and gradients, ragged shapes, fp32 and bf16,
ranks 1 to 64), no dW and only x and s saved, lowering for TPU and CUDA from this CPU,
and a real run when a GPU is present."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.ad_checkpoint import print_saved_residuals

from jft.pallas_kernels import lora_linear as fused
from jft.pallas_kernels.lora_linear import lora_linear, lora_linear_reference

TARGETS = ("tpu", "gpu")
SCALE = 0.7
# The CUDA export check refuses custom calls it does not know; Triton kernels are one.
TRITON_CHECKS = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


def _operands(lead, m, k, n, r, dtype, seed=0):
    rng = np.random.default_rng(seed)

    def normal(*shape, std=1.0):
        return jnp.asarray(std * rng.standard_normal(shape), dtype)

    return (normal(*lead, m, k), normal(k, n, std=k**-0.5), normal(k, r, std=k**-0.5),
            normal(r, n))


def _assert_close(got, want, tol):
    """Max abs error within tol of the reference's largest magnitude, dtypes equal."""
    chex.assert_equal_shape([got, want])
    chex.assert_trees_all_equal_dtypes(got, want)
    scale = float(np.max(np.abs(np.asarray(want, np.float32))))
    chex.assert_trees_all_close(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                atol=tol * scale, rtol=0)


def _check_against_reference(target, operands, tol, **blocks):
    def kernel(x, w, a, b):
        return fused._lora_linear(x, w, a, b, SCALE, target=target, interpret=True, **blocks)

    def reference(x, w, a, b):
        return lora_linear_reference(x, w, a, b, SCALE)

    @jax.jit
    def output_and_gradients(operands, dy):
        def apply(function):
            y, vjp = jax.vjp(function, *operands)
            return y, vjp(dy)

        return apply(kernel), apply(reference)

    x, w = operands[:2]
    dy = jnp.asarray(np.random.default_rng(1).standard_normal((*x.shape[:-1], w.shape[1])),
                     x.dtype)
    (y, (dx, dw, da, db)), (y_ref, (dx_ref, _, da_ref, db_ref)) = output_and_gradients(
        operands, dy)
    for got, want in ((y, y_ref), (dx, dx_ref), (da, da_ref), (db, db_ref)):
        _assert_close(got, want, tol)
    assert not np.any(np.asarray(dw))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype, rank, tol", [
    (jnp.float32, 1, 1e-5), (jnp.float32, 8, 1e-5), (jnp.float32, 64, 1e-5),
    (jnp.bfloat16, 8, 2e-2),
])
def test_ragged_shapes_match_the_reference(target, dtype, rank, tol):
    _check_against_reference(target, _operands((2,), 37, 72, 50, rank, dtype), tol)


@pytest.mark.parametrize("target, blocks", [
    ("tpu", dict(block_m=128, block_n=128, block_k=128)),
    ("gpu", dict(block_m=32, block_n=32, block_k=16)),
])
def test_several_blocks_per_dim_match_the_reference(target, blocks, monkeypatch):
    # Small blocks force padding, a loop over K, several dB partials and (GPU) dS partials.
    monkeypatch.setattr(fused, "_GPU_SPLIT_COLUMNS", 96)
    operands = _operands((2,), 150, 300, 260, 16, jnp.bfloat16)
    _check_against_reference(target, operands, 2e-2, **blocks)


def test_public_api_takes_a_traced_scale_and_keeps_param_dtypes():
    x, w, a, b = _operands((), 24, 40, 48, 4, jnp.bfloat16)
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)

    @jax.jit
    def loss(x, a, b, scale):
        return jnp.sum(lora_linear(x, w, a, b, scale).astype(jnp.float32))

    grads = jax.grad(loss, argnums=(0, 1, 2))(x, a, b, jnp.float32(SCALE))
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.float32, jnp.float32]
    want = jax.grad(lambda x, a, b: jnp.sum(
        lora_linear_reference(x, w, a, b, SCALE).astype(jnp.float32)), argnums=(0, 1, 2))(
        x, a, b)
    for got, ref in zip(grads, want, strict=True):
        _assert_close(got, ref, 2e-2)


def _equations(jaxpr):
    """Every equation, descending into sub-jaxprs but not into Pallas kernels (which see
    blocks, not arrays)."""
    for eqn in jaxpr.eqns:
        yield eqn
        if eqn.primitive.name == "pallas_call":
            continue
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _equations(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _equations(sub)


@pytest.mark.parametrize("target", TARGETS)
def test_backward_has_no_weight_gradient_product(target):
    m, k, n, r = 37, 72, 50, 8
    x, w, a, b = _operands((), m, k, n, r, jnp.float32)

    def loss(x, w, a, b):
        return jnp.sum(fused._lora_linear(x, w, a, b, SCALE, target=target, interpret=True))

    grad = jax.grad(loss, argnums=(0, 1, 2, 3))
    tiles = fused._tiles(fused._Plan(target, True, None, None, None), m, n, k, r, x.dtype)
    weight_shapes = {(k, n), (tiles.k, tiles.n)}
    products = [tuple(v.aval.shape) for eqn in _equations(jax.make_jaxpr(grad)(x, w, a, b).jaxpr)
                if eqn.primitive.name in ("dot_general", "pallas_call") for v in eqn.outvars]
    assert products and not weight_shapes & set(products)
    assert not np.any(np.asarray(grad(x, w, a, b)[1]))


def test_only_x_and_s_are_saved_besides_the_params(capsys):
    m, k, n, r = 37, 72, 50, 8
    operands = _operands((2,), m, k, n, r, jnp.bfloat16)
    print_saved_residuals(
        lambda x, w, a, b: fused._lora_linear(x, w, a, b, SCALE, target="tpu", interpret=True),
        *operands)
    saved = capsys.readouterr().out.strip().splitlines()
    activations = [line for line in saved if "from the argument" not in line
                   and "from a literal" not in line]
    # Params (w, a, b) are arguments, kept by reference; x is the argument reshaped to [M, K].
    assert sorted(line.split()[0] for line in activations) == [f"bf16[{2 * m},{k}]",
                                                               f"bf16[{2 * m},{r}]"]


@pytest.mark.parametrize("target, platform", [("tpu", "tpu"), ("gpu", "cuda")])
@pytest.mark.parametrize("shape", [(256, 512, 256, 16), (37, 72, 50, 1)])
def test_forward_and_backward_lower_for_the_real_backend(target, platform, shape):
    m, k, n, r = shape
    operands = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((m, k), (k, n), (k, r), (r, n))]

    def apply(x, w, a, b):
        return fused._lora_linear(x, w, a, b, SCALE, target=target, interpret=False)

    def loss(x, w, a, b):
        return jnp.sum(apply(x, w, a, b).astype(jnp.float32))

    checks = TRITON_CHECKS if platform == "cuda" else []
    kernel_call = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
    for function, kernels in ((apply, 1), (jax.grad(loss, argnums=(0, 2, 3)), 2)):
        exported = export.export(jax.jit(function), platforms=[platform],
                                 disabled_checks=checks)(*operands)
        assert exported.mlir_module().count(kernel_call) == kernels


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("dtype, tol", [(jnp.bfloat16, 2e-2), (jnp.float32, 1e-4)])
def test_compiled_triton_kernels_match_the_reference_on_gpu(dtype, tol):
    x, w, a, b = _operands((2,), 300, 1024, 768, 16, dtype)

    def output_and_gradients(function):
        def loss(x, a, b):
            return jnp.sum(function(x, w, a, b, SCALE).astype(jnp.float32) ** 2)

        return jax.jit(function)(x, w, a, b, SCALE), jax.jit(jax.grad(loss, (0, 1, 2)))(x, a, b)

    # No TF32 in float32 XLA dots: the Triton kernels' float32 dots are exact too.
    with jax.default_matmul_precision("highest"):
        got, want = output_and_gradients(lora_linear), output_and_gradients(
            lora_linear_reference)
    for got_array, want_array in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        _assert_close(got_array, want_array, tol)
