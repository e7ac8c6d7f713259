"""Log-probabilities of whole sequences, which the preference objectives compare.

A preference batch holds two halves of R rows each, [first; second]: the chosen and the
rejected completions (DPO and kin), or an example and its mismatched KL sequence (KTO).
Both halves are packed alike (`jft.training.data.Batcher` with paired examples), so
segment k of row r in the first half and segment k of row r in the second belong to one
example. A sequence's log-probability is the sum over its target tokens (its completion)
of log p(token | the tokens before it), as TRL computes it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jft.objectives.auxiliary import auxiliary_loss
from jft.objectives.sft import token_losses, token_losses_and_aux

REFERENCE_FIELD = "reference_logps"  # precomputed per-token reference log-probs, if any
# The scalar under this key of an objective's metrics is added to its loss, not logged.
AUXILIARY = "auxiliary_loss"


def token_logps(model, params, adapters, batch, rng=None):
    """(log-probability [R, T] of each token given those before it in its segment, the
    target mask [R, T]); position 0 and non-targets hold values the mask excludes."""
    losses, mask = token_losses(model, params, adapters, batch, rng)
    return -losses, mask


def policy_token_logps(model, params, adapters, batch, rng=None):
    """`token_logps` of the policy being trained, and {AUXILIARY: what its layers add to
    the loss (an MoE router's balance loss), and those terms as metrics}."""
    losses, mask, aux = token_losses_and_aux(model, params, adapters, batch, rng)
    extra, metrics = auxiliary_loss(model, aux)
    return -losses, mask, {AUXILIARY: extra, **metrics}


def reference_adapters(adapters):
    """The reference model's adapters: those of the stack kept frozen (none for a plain
    run), i.e. the trained adapter switched off."""
    return tuple(a for a in adapters if a.frozen)


def reference_token_logps(model, params, adapters, batch):
    """Per-token log-probabilities [R, T] under the reference: precomputed in the batch
    when the run cached them, else the same forward with the trained adapter off."""
    if REFERENCE_FIELD in batch:
        return batch[REFERENCE_FIELD]
    logps, _ = token_logps(model, params, reference_adapters(adapters), batch)
    return jax.lax.stop_gradient(logps)


def segment_sums(values, batch):
    """Sums of `values` [R, T] over each segment of each row: [R, T], segment k of row r
    at [r, k - 1] (zeros where a row has fewer segments). Padding is left out."""
    segments = batch["segment_ids"]
    length = values.shape[1]
    values = jnp.where(segments > 0, values, 0)
    index = jnp.maximum(segments - 1, 0)
    return jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, num_segments=length))(values, index)


class Pairs(NamedTuple):
    """Per example (a [R, T] grid of (row, segment) slots; `valid` marks the real ones):
    summed log-probabilities and target counts of its first and second sequences."""

    first: jax.Array
    second: jax.Array
    first_count: jax.Array
    second_count: jax.Array
    valid: jax.Array


def pair_sums(logps, mask, batch) -> Pairs:
    """`Pairs` of a [first; second] batch: an example counts when both of its sequences
    keep a target token (one truncated to its prompt does not)."""
    sums = segment_sums(jnp.where(mask, logps, 0.0), batch)
    counts = segment_sums(mask.astype(jnp.float32), batch)
    half = logps.shape[0] // 2
    first_count, second_count = counts[:half], counts[half:]
    return Pairs(sums[:half], sums[half:], first_count, second_count,
                 (first_count > 0) & (second_count > 0))


def masked_mean(values, valid):
    """Mean of `values` where `valid` (0 where none is)."""
    return jnp.sum(jnp.where(valid, values, 0.0)) / jnp.maximum(valid.sum(), 1)


def masked_sum(values, valid):
    return jnp.sum(jnp.where(valid, values, 0.0))


def real_token_mask(batch):
    """Every token of an example but its first (its prompt too): what ORPO's NLL averages."""
    return (batch["segment_ids"] != 0) & (batch["positions"] > 0)


def reward_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict:
    """TRL's logged preference metrics, per example."""
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": chosen_logps,
        "logps/rejected": rejected_logps,
    }


class PairwiseObjective:
    """An objective whose loss is a mean over examples of a per-example loss: `per_example`
    gives (losses, valid, {metric: per-example values}, {metric: batch scalars}); the
    step minimises the mean, and evaluation sums them over the eval set."""

    formats = ("preference",)
    per_token = False

    def per_example(self, model, params, adapters, batch, rng):
        raise NotImplementedError

    def loss(self, model, params, adapters, batch, rng):
        losses, valid, metrics, scalars = self.per_example(model, params, adapters, batch, rng)
        means = {name: masked_mean(values, valid) for name, values in metrics.items()}
        extra = scalars.pop(AUXILIARY, 0.0)
        return masked_mean(losses, valid) + extra, {**means, **scalars, "pairs": valid.sum()}

    def held_out(self, model, params, adapters, batch):
        losses, valid, metrics, _ = self.per_example(model, params, adapters, batch, None)
        sums = {name: masked_sum(values, valid) for name, values in metrics.items()}
        return masked_sum(losses, valid), valid.sum(), sums
