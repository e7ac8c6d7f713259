"""Blockwise attention (keys a block at a time, custom VJP) against XLA's attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jft.models import ModelConfig, RopeConfig, RuntimePolicy, forward, init_params
from jft.models import attention as attention_blocks
from jft.models.attention import blockwise_attention


def _packed_mask(segments):
    """Causal, within-segment masks [B, 1, T, T]; segment 0 (padding) sees nothing."""
    segments = jnp.asarray(segments)
    length = segments.shape[1]
    causal = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]
    same = segments[:, :, None] == segments[:, None, :]
    return (causal[None] & same & (segments[:, None, :] != 0))[:, None]


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_blockwise_attention_matches_xla_values_and_gradients(dtype, tol):
    # 37 keys: blocks of 8 leave a ragged last block; GQA (6 query heads on 2 KV heads);
    # a packed row with padding queries that see no key at all.
    kq, kk, kv, kd = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (2, 37, 6, 8), dtype)
    k = jax.random.normal(kk, (2, 37, 2, 8), dtype)
    v = jax.random.normal(kv, (2, 37, 2, 8), dtype)
    d_out = jax.random.normal(kd, (2, 37, 6, 8), dtype)
    mask = _packed_mask([[1] * 20 + [2] * 12 + [0] * 5, [1] * 37])

    def xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=0.3, implementation="xla")

    def blockwise(q, k, v):
        return blockwise_attention(q, k, v, mask, 0.3, block=8)

    expected, expected_pullback = jax.vjp(xla, q, k, v)
    got, pullback = jax.vjp(blockwise, q, k, v)
    scale = float(jnp.abs(expected.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32),
                               atol=tol * scale)
    for name, g, e in zip("qkv", pullback(d_out), expected_pullback(d_out), strict=True):
        e = np.asarray(e, np.float32)
        np.testing.assert_allclose(np.asarray(g, np.float32), e, atol=tol * np.abs(e).max(),
                                   err_msg=f"d{name}")


def test_blockwise_attention_keeps_no_per_key_block_logits_for_the_backward_pass():
    q = jnp.ones((1, 64, 4, 8))
    k = v = jnp.ones((1, 64, 2, 8))
    mask = _packed_mask([[1] * 64])

    def saved(attend):
        _, residuals = jax.vjp(lambda q, k, v: attend(q, k, v), q, k, v)
        return [leaf.shape for leaf in jax.tree.leaves(residuals)]

    xla = saved(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask))
    blockwise = saved(lambda q, k, v: blockwise_attention(q, k, v, mask, 8**-0.5, block=16))
    logits_shape = (1, 4, 64, 64)  # what XLA's attention keeps, in some layout
    assert any(np.prod(s) >= np.prod(logits_shape) * 1 and len(s) >= 4 and s[-1] == 64
               and s[-2] == 64 for s in xla), xla
    # Blockwise keeps q, k, v, the mask, the output and two [B, K, G, T] statistics.
    assert not any(len(s) >= 4 and s[-1] == 64 and s[-2] == 64 and np.prod(s) > 64 * 64
                   for s in blockwise), blockwise


def test_long_sequences_take_the_blockwise_path_with_the_same_losses(monkeypatch):
    model = ModelConfig(
        family="llama", vocab_size=32, embed_dim=32, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, mlp_dim=48, norm_eps=1e-6, rope=RopeConfig(),
        layer_types=("full", "full"), policy=RuntimePolicy(dtype="float32"),
    )
    params = init_params(model, jax.random.key(0), std=0.2)
    tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, 32)
    segments = jnp.asarray([[1] * 25 + [2] * 15, [1] * 33 + [0] * 7])
    monkeypatch.setattr(attention_blocks, "BLOCK", 16)  # 40 keys: "long"

    def loss(params, impl):
        logits = forward(model.replace(attention_impl=impl), params, tokens,
                         segment_ids=segments)
        return jnp.mean(jax.nn.log_softmax(logits) ** 2)

    assert "custom_vjp" in str(jax.make_jaxpr(lambda p: loss(p, None))(params))
    got, grads = jax.value_and_grad(loss)(params, None)
    expected, expected_grads = jax.value_and_grad(loss)(params, "xla")
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)
