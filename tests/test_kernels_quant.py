"""The fused dequantize-and-matmul (pallas_kernels/quant_matmul.py): the kernels in
interpret mode against the XLA reference for every format (outputs, dx, no weight
gradient, ragged M and N, one and several tiles per dim), the fallback for ragged
blocks, what the backward saves, lowering for CUDA from this CPU, and a real run when a
GPU is present."""

from __future__ import annotations

import chex
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.ad_checkpoint import print_saved_residuals

from jft.pallas_kernels import MEASURED_FASTER, use_pallas
from jft.pallas_kernels import quant_matmul as fused
from jft.pallas_kernels.quant_matmul import quant_matmul, quant_matmul_reference
from jft.quant import QuantizedTensor, quantize
from jft.quant.formats import FORMATS

# (format, block, double quantization)
WEIGHTS = [("nf4", 64, False), ("nf4", 64, True), ("fp4", 128, False), ("fp4", 64, True),
           ("int8", 64, False), ("q8_0", 32, False), ("q4_0", 32, False)]
# Small blocks: several tiles in M, N and K, each K tile spanning several scale blocks.
SMALL_BLOCKS = dict(block_m=16, block_n=16, block_k=128)
# Default blocks: one padded tile in M and N; float32's K tile of 32 lies inside a block.
CASES = ([(*weight, SMALL_BLOCKS) for weight in WEIGHTS]
         + [(*weight, {}) for weight in WEIGHTS if weight[1] > 32 and weight[0] != "fp4"])
# The CUDA export check refuses custom calls it does not know; Triton kernels are one.
TRITON_CHECKS = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]


def _weight(format, block, double_quant, n, k, seed=0):
    """A random [n, k] matrix, quantized."""
    array = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    if format in ("q8_0", "q4_0"):
        # As a GGUF file provides them: the gguf package's bytes, split into codes and
        # scales. (jft.quant.quantize's GGUF path keeps a blocks axis in the codes.)
        codes, scales = FORMATS[format].split(gguf.quants.quantize(array, FORMATS[format].qtype))
        return QuantizedTensor(codes, scales, None, None, format, 32, k)
    return quantize(array, format, block, double_quant)


def _normal(shape, dtype, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _assert_close(got, want, tol):
    """Max abs error within tol of the reference's largest magnitude, dtypes equal."""
    chex.assert_equal_shape([got, want])
    chex.assert_trees_all_equal_dtypes(got, want)
    scale = float(np.max(np.abs(np.asarray(want, np.float32))))
    chex.assert_trees_all_close(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                atol=tol * scale, rtol=0)


def _check_against_reference(x, weight, tol, out_dtype=None, **blocks):
    """y and dx of the kernel against the reference's; the weight's cotangent is zero."""

    @jax.jit
    def output_and_gradients(x, weight, dy):
        def apply(function):
            y, vjp = jax.vjp(lambda x, w: function(x, w, out_dtype), x, weight)
            return y, vjp(dy)

        kernel = apply(lambda x, w, out: quant_matmul(x, w, out, interpret=True, **blocks))
        return kernel, apply(quant_matmul_reference)

    y_shape = (*x.shape[:-1], weight.shape[0])
    dy = _normal(y_shape, out_dtype or x.dtype, seed=1)
    (y, (dx, dweight)), (y_ref, (dx_ref, _)) = output_and_gradients(x, weight, dy)
    _assert_close(y, y_ref, tol)
    _assert_close(dx, dx_ref, tol)
    for leaf, primal in zip(jax.tree.leaves(dweight), jax.tree.leaves(weight), strict=True):
        if jnp.issubdtype(primal.dtype, jnp.integer):
            assert leaf.dtype == jax.dtypes.float0  # integer codes: no cotangent at all
        else:
            assert not np.any(np.asarray(leaf))


@pytest.mark.parametrize("format, block, double_quant, blocks", CASES)
def test_ragged_shapes_match_the_reference(format, block, double_quant, blocks):
    weight = _weight(format, block, double_quant, n=50, k=256)
    x = _normal((2, 19, 256), jnp.float32, seed=2)  # M = 38 rows, N = 50: both padded
    _check_against_reference(x, weight, 1e-5, **blocks)


@pytest.mark.parametrize("format, block, double_quant, out_dtype", [
    ("nf4", 64, True, None), ("nf4", 64, True, jnp.float32), ("q4_0", 32, False, None)])
def test_bfloat16_inputs_match_the_reference(format, block, double_quant, out_dtype):
    weight = _weight(format, block, double_quant, n=48, k=192)
    x = _normal((40, 192), jnp.bfloat16, seed=3)
    # The kernels compute dx in x's dtype, so with float32 outputs dy is rounded to
    # bfloat16 first, where the reference keeps it in float32.
    _check_against_reference(x, weight, 2e-2, out_dtype=out_dtype)


def test_ragged_blocks_take_the_reference():
    weight = _weight("nf4", 64, True, n=24, k=100)  # a last block of 36 columns
    x = _normal((8, 100), jnp.float32, seed=4)
    jaxpr = jax.make_jaxpr(lambda x: quant_matmul(x, weight, interpret=True))(x)
    assert "pallas_call" not in str(jaxpr)
    np.testing.assert_array_equal(quant_matmul(x, weight, interpret=True),
                                  quant_matmul_reference(x, weight))


def test_only_the_weight_is_saved_for_the_backward(capsys):
    weight = _weight("int8", 64, False, n=50, k=256)
    x = _normal((37, 256), jnp.float32, seed=5)
    print_saved_residuals(lambda x, w: quant_matmul(x, w, interpret=True), x, weight)
    saved = capsys.readouterr().out.strip().splitlines()
    # The codes and scales are arguments (params, kept by reference); x is not needed.
    assert saved and all("from the argument w" in line for line in saved)


@pytest.mark.parametrize("format, block, double_quant", WEIGHTS)
def test_forward_and_backward_lower_for_cuda(format, block, double_quant):
    weight = _weight(format, block, double_quant, n=50, k=384)  # 3 x 128: K not a power of 2
    x = jax.ShapeDtypeStruct((37, 384), jnp.bfloat16)

    def apply(x, weight):
        return fused._quant_matmul(x, weight, target="gpu", interpret=False)

    def loss_and_dx(x, weight):
        return jax.value_and_grad(lambda x: jnp.sum(apply(x, weight).astype(jnp.float32)))(x)

    for function, kernels in ((apply, 1), (loss_and_dx, 2)):
        exported = export.export(jax.jit(function), platforms=["cuda"],
                                 disabled_checks=TRITON_CHECKS)(x, weight)
        assert exported.mlir_module().count("__gpu$xla.gpu.triton") == kernels


def test_auto_keeps_the_reference_until_measured():
    assert "quant_matmul" in MEASURED_FASTER
    assert use_pallas("quant_matmul", "pallas") and not use_pallas("quant_matmul", "xla")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("format, block, double_quant", WEIGHTS)
def test_compiled_triton_kernels_match_the_reference_on_gpu(format, block, double_quant):
    weight = jax.tree.map(jnp.asarray, _weight(format, block, double_quant, n=768, k=1024))
    x = _normal((300, 1024), jnp.bfloat16, seed=6)

    def output_and_dx(function):
        def loss(x):
            return jnp.sum(function(x, weight).astype(jnp.float32) ** 2)

        return jax.jit(function)(x, weight), jax.jit(jax.grad(loss))(x)

    got, want = output_and_dx(quant_matmul), output_and_dx(quant_matmul_reference)
    for got_array, want_array in zip(got, want, strict=True):
        _assert_close(got_array, want_array, 2e-2)
