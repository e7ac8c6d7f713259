"""KTO (Ethayarajh et al. 2024): unpaired feedback, each completion marked desirable or not.

With r = log π(y|x) − log π_ref(y|x) (summed over completion tokens) and z the KL
estimate, desirable examples cost 1 − σ(β(r − z)) and undesirable ones 1 − σ(β(z − r)),
weighted by `desirable_weight` and `undesirable_weight` and averaged over the examples.
z = max(0, mean over the batch of log π(y'|x) − log π_ref(y'|x)), without gradient, where
y' is a mismatched completion: example i's prompt with example i−1's completion (TRL's
rotation), which the data pipeline packs as the batch's second half.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jft.objectives.base import ObjectiveBase, register
from jft.objectives.dpo import ReferenceOptions
from jft.objectives.sequences import (
    PairwiseObjective,
    masked_mean,
    pair_sums,
    policy_token_logps,
    reference_token_logps,
    segment_sums,
)

DESIRABLE_FIELD = "desirable"  # per token: the example's label


def kto_losses(logratios, desirable, kl, *, beta: float, desirable_weight: float = 1.0,
               undesirable_weight: float = 1.0):
    """The per-example KTO loss (weights included)."""
    chosen = 1 - jax.nn.sigmoid(beta * (logratios - kl))
    rejected = 1 - jax.nn.sigmoid(beta * (kl - logratios))
    return jnp.where(desirable, desirable_weight * chosen, undesirable_weight * rejected)


@register
class Kto(PairwiseObjective, ObjectiveBase):
    name = "kto"
    formats = ("kto",)
    compares_with_reference = True

    @dataclasses.dataclass(frozen=True)
    class Config(ReferenceOptions):
        beta: float = dataclasses.field(default=0.1, metadata=dict(above=0.0))
        desirable_weight: float = dataclasses.field(default=1.0, metadata=dict(above=0.0))
        undesirable_weight: float = dataclasses.field(default=1.0, metadata=dict(above=0.0))

    def per_example(self, model, params, adapters, batch, rng):
        config = self.config
        logps, mask, auxiliary = policy_token_logps(model, params, adapters, batch, rng)
        half = logps.shape[0] // 2
        # The KL sequences' log-probs carry no gradient (TRL computes them under no_grad).
        logps = jnp.concatenate([logps[:half], jax.lax.stop_gradient(logps[half:])])
        policy = pair_sums(logps, mask, batch)
        reference = pair_sums(reference_token_logps(model, params, adapters, batch), mask,
                              batch)
        kl = jnp.maximum(masked_mean(policy.second - reference.second, policy.valid), 0.0)
        logratios = policy.first - reference.first
        valid = policy.first_count > 0
        desirable = segment_sums(batch[DESIRABLE_FIELD].astype(jnp.float32), batch)[:half] > 0
        losses = kto_losses(logratios, desirable, kl, beta=config.beta,
                            desirable_weight=config.desirable_weight,
                            undesirable_weight=config.undesirable_weight)
        rewards = jax.lax.stop_gradient(config.beta * logratios)
        chosen, rejected = valid & desirable, valid & ~desirable
        scalars = {
            "kl": kl,
            "rewards/chosen": masked_mean(rewards, chosen),
            "rewards/rejected": masked_mean(rewards, rejected),
            "logps/chosen": masked_mean(jax.lax.stop_gradient(policy.first), chosen),
            "logps/rejected": masked_mean(jax.lax.stop_gradient(policy.first), rejected),
        }
        scalars["rewards/margins"] = scalars["rewards/chosen"] - scalars["rewards/rejected"]
        # Held-out KTO reports its loss only: its reward means are over the desirable and
        # the undesirable examples apart, which a sum over all examples cannot give.
        return losses, valid, {}, {**scalars, **auxiliary}
