"""Supervised fine-tuning: next-token cross-entropy on the target tokens.

A batch is a dict of [B, T] arrays (see `jft.training.data`): `tokens`, `segment_ids` (0 =
padding), `positions`, and `loss_mask` (True where the token is a training target:
completions only for prompt-completion and chat data). Token t is predicted from the
positions before it in the same segment, so the first token of every example is never
a target, and packed examples never see each other.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jft.models import ModelConfig, forward, output_logits
from jft.objectives.auxiliary import auxiliary_loss
from jft.objectives.base import ObjectiveBase, register

# The float32 logits of one loss chunk stay under this many bytes: at Llama 3's 128k
# vocabulary the logits of one 8k-token row alone are 4 GiB, and their gradient as much.
LOSS_CHUNK_BYTES = 256 * 2**20


def token_losses(model: ModelConfig, params, adapters, batch, rng=None):
    """Per-token cross-entropy [B, T] and the target mask [B, T] (position 0 never counts)."""
    losses, mask, _ = token_losses_and_aux(model, params, adapters, batch, rng)
    return losses, mask


def token_losses_and_aux(model: ModelConfig, params, adapters, batch, rng=None):
    """`token_losses`, and what the layers report for the loss (`auxiliary.py`)."""
    (hidden, head), aux = forward(model, params, batch["tokens"], batch["positions"],
                                  batch["segment_ids"], adapters=adapters, rng=rng,
                                  return_hidden=True, return_aux=True)
    return (*hidden_token_losses(model, hidden, head, batch), aux)


def hidden_token_losses(model: ModelConfig, hidden, head, batch):
    """`token_losses` from the final hidden states [B, T, D] and the output head, for
    objectives that also read the hidden states (GeRe)."""
    targets = batch["tokens"][:, 1:]
    segments = batch["segment_ids"]
    mask = batch["loss_mask"][:, 1:] & (segments[:, 1:] == segments[:, :-1]) & (
        segments[:, 1:] != 0
    )
    losses = chunked_cross_entropy(model, hidden[:, :-1], head, targets)
    pad = jnp.zeros((losses.shape[0], 1), losses.dtype)
    return jnp.concatenate([pad, losses], 1), jnp.concatenate([pad.astype(bool), mask], 1)


def chunked_cross_entropy(model: ModelConfig, hidden, head, targets, chunk_bytes=None):
    """Cross-entropy [B, T] of the logits of `hidden` [B, T, D] against `targets` [B, T].

    The logits are computed a chunk of positions at a time and recomputed in the backward
    pass (`jax.checkpoint`), so only one chunk's [B, C, V] logits ever exist: the same
    values as the whole-sequence loss, at a fraction of its memory.
    """
    batch, length, _ = hidden.shape
    chunk = max(8, (chunk_bytes or LOSS_CHUNK_BYTES) // (4 * model.vocab_size * batch))

    def losses(h, t):
        return optax.softmax_cross_entropy_with_integer_labels(output_logits(model, h, head), t)

    if length <= chunk:
        return losses(hidden, targets)
    pad = -length % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    count = (length + pad) // chunk

    def chunks(x):  # [B, count * C, ...] -> [count, B, C, ...]
        return jnp.moveaxis(x.reshape(batch, count, chunk, *x.shape[2:]), 1, 0)

    per_chunk = jax.lax.map(lambda ht: jax.checkpoint(losses)(*ht),
                            (chunks(hidden), chunks(targets)))
    return jnp.moveaxis(per_chunk, 0, 1).reshape(batch, count * chunk)[:, :length]


def mean_loss(model, params, adapters, batch, rng=None):
    """(mean target cross-entropy, plus the layers' auxiliary losses (an MoE router's
    balance loss); target count; the auxiliary terms as metrics)."""
    losses, mask, aux = token_losses_and_aux(model, params, adapters, batch, rng)
    count = jnp.maximum(mask.sum(), 1)
    extra, metrics = auxiliary_loss(model, aux)
    return jnp.sum(jnp.where(mask, losses, 0.0)) / count + extra, count, metrics


def example_losses(model, params, adapters, batch) -> jax.Array:
    """Mean target loss of each example [B, S] (by segment id 1..S; NaN where absent)."""
    losses, mask = token_losses(model, params, adapters, batch)
    segments = batch["segment_ids"]
    num = int(segments.max())
    ids = jnp.arange(1, num + 1)[None, :, None]  # [1, S, 1]
    in_segment = (segments[:, None, :] == ids) & mask[:, None, :]
    total = jnp.sum(jnp.where(in_segment, losses[:, None, :], 0.0), axis=-1)
    count = in_segment.sum(-1)
    return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)


@register
class Sft(ObjectiveBase):
    name = "sft"

    def loss(self, model, params, adapters, batch, rng):
        loss, count, metrics = mean_loss(model, params, adapters, batch, rng)
        return loss, {"tokens": count, **metrics}

    def held_out(self, model, params, adapters, batch):
        losses, mask = token_losses(model, params, adapters, batch)
        return jnp.sum(jnp.where(mask, losses, 0.0)), mask.sum(), {}


SFT = Sft()
