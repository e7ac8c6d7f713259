"""Memory-efficient attention in plain JAX: keys a block at a time, online softmax.

XLA's attention (`jax.nn.dot_product_attention(implementation="xla")`) forms the
[B, N, T, S] float32 logits and keeps them, and the probabilities, for the backward
pass: 150 MB per layer for one 2k-token row of a 9-head model, 2 GiB at 8k tokens with
32 heads, times every layer. This one scans over key blocks with a running max and sum
(FlashAttention's recurrence) and, under a custom VJP, saves only q, k, v, the output
and the per-query softmax max and sum; the backward pass recomputes each block's probabilities.
Memory grows with T x block instead of T x S, on every backend. On GPUs cuDNN's fused
kernel is faster still where it applies (see `transformer.attention`).

Masked positions get the same large negative logit as XLA's implementation, so a query
that sees no key (padding) gets the same (uniform) output; keys added to fill the last
block get minus infinity and never count.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

BLOCK = 512


def blockwise_attention(q, k, v, mask, scale: float, block: int | None = None):
    """q [B, T, N, H], k/v [B, S, K, H], mask [B, 1, T, S] bool -> [B, T, N, H]."""
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    block = min(block or BLOCK, s)
    pad = -s % block
    if pad:  # the last block's extra keys are marked unreal below, whatever their mask
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, pad)))
    grouped = q.reshape(b, t, kv_heads, n // kv_heads, h)
    out = _attention(grouped, k, v, mask, s, block, scale)
    return out.reshape(b, t, n, h)


_MASKED = float(-0.7 * jnp.finfo(jnp.float32).max)  # jax.nn's large negative logit


def _block_logits(q, k, mask, index, length, block, scale):
    """The keys of block `index`, their [B, K, G, T, block] float32 logits, masked as
    XLA masks them (padding keys beyond `length`: minus infinity), and which are kept."""
    start = index * block
    k_block = jax.lax.dynamic_slice_in_dim(k, start, block, axis=1)
    mask_block = jax.lax.dynamic_slice_in_dim(mask, start, block, axis=3)  # [B, 1, T, block]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k_block,
                        preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask_block[:, :, None], logits, _MASKED)
    real = start + jnp.arange(block) < length
    return k_block, jnp.where(real, logits, -jnp.inf), mask_block[:, :, None] & real


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, mask, length, block, scale):
    return _forward(q, k, v, mask, length, block, scale)[0]


def _forward(q, k, v, mask, length, block, scale):
    b, t, kv_heads, groups, h = q.shape
    stats_shape = (b, kv_heads, groups, t)

    def step(carry, index):
        running_max, total, acc = carry
        _, logits, _ = _block_logits(q, k, mask, index, length, block, scale)
        v_block = jax.lax.dynamic_slice_in_dim(v, index * block, block, axis=1)
        new_max = jnp.maximum(running_max, logits.max(-1))
        correction = jnp.exp(running_max - new_max)
        probs = jnp.exp(logits - new_max[..., None])
        total = total * correction + probs.sum(-1)
        update = jnp.einsum("BKGTS,BSKH->BTKGH", probs.astype(v.dtype), v_block,
                            preferred_element_type=jnp.float32)
        acc = acc * jnp.moveaxis(correction, 3, 1)[..., None] + update
        return (new_max, total, acc), None

    init = (jnp.full(stats_shape, -jnp.inf, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros(q.shape, jnp.float32))
    blocks = jnp.arange(k.shape[1] // block)
    (running_max, total, acc), _ = jax.lax.scan(step, init, blocks)
    out = (acc / jnp.moveaxis(total, 3, 1)[..., None]).astype(q.dtype)
    # The softmax statistics [B, K, G, T] kept apart, not as max + log(total): a query
    # that sees no key has max = the masked logit, which absorbs log(total) in float32.
    return out, (running_max, total)


def _attention_fwd(q, k, v, mask, length, block, scale):
    out, stats = _forward(q, k, v, mask, length, block, scale)
    return out, (q, k, v, mask, out, stats)


def _attention_bwd(length, block, scale, residuals, d_out):
    q, k, v, mask, out, (running_max, total) = residuals
    # D = rowsum(dO * O): the softmax Jacobian's correction term, per query.
    correction = jnp.moveaxis(
        jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1), 1, 3)

    def step(d_q, index):
        k_block, logits, kept = _block_logits(q, k, mask, index, length, block, scale)
        v_block = jax.lax.dynamic_slice_in_dim(v, index * block, block, axis=1)
        probs = jnp.exp(logits - running_max[..., None]) / total[..., None]
        d_v = jnp.einsum("BKGTS,BTKGH->BSKH", probs.astype(d_out.dtype), d_out,
                         preferred_element_type=jnp.float32)
        d_probs = jnp.einsum("BTKGH,BSKH->BKGTS", d_out, v_block,
                             preferred_element_type=jnp.float32)
        # Masked logits are constants (as under XLA's jnp.where): no gradient, even where
        # a query sees no key and spreads its attention evenly over the masked ones.
        d_logits = jnp.where(kept, probs * (d_probs - correction[..., None]) * scale, 0)
        d_logits = d_logits.astype(q.dtype)
        d_q = d_q + jnp.einsum("BKGTS,BSKH->BTKGH", d_logits, k_block,
                               preferred_element_type=jnp.float32)
        d_k = jnp.einsum("BKGTS,BTKGH->BSKH", d_logits, q, preferred_element_type=jnp.float32)
        return d_q, (d_k.astype(k.dtype), d_v.astype(v.dtype))

    blocks = jnp.arange(k.shape[1] // block)
    d_q, (d_k, d_v) = jax.lax.scan(step, jnp.zeros(q.shape, jnp.float32), blocks)
    # [S/block, B, block, K, H] -> [B, S, K, H]
    d_k, d_v = (jnp.moveaxis(d, 0, 1).reshape(k.shape) for d in (d_k, d_v))
    return d_q.astype(q.dtype), d_k, d_v, None


_attention.defvjp(_attention_fwd, _attention_bwd)
