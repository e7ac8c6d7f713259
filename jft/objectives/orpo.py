"""ORPO (Hong et al. 2024): SFT on the chosen completion plus an odds-ratio penalty, with
no reference model.

With p = exp(mean log-probability of a completion's tokens) and
odds(y) = p / (1 − p), the loss is NLL(chosen) − λ·log σ(log odds(y_w) − log odds(y_l)),
averaged over pairs; the NLL is the mean over the chosen sequence's tokens, prompt
included (TRL and the authors' code). λ is `beta` (TRL's name), 0.1 by default.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jft.objectives.base import ObjectiveBase, register
from jft.objectives.sequences import (
    PairwiseObjective,
    masked_mean,
    pair_sums,
    policy_token_logps,
    real_token_mask,
    reward_metrics,
)


def log1mexp(x):
    """log(1 − exp(x)) for x < 0, stable on both sides of −log 2."""
    return jnp.where(x < -jnp.log(2.0), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def odds_ratio_terms(chosen_mean_logps, rejected_mean_logps):
    """(log σ(log-odds ratio), log-odds ratio) per pair, from mean token log-probs."""
    log_odds = (chosen_mean_logps - rejected_mean_logps) - (
        log1mexp(chosen_mean_logps) - log1mexp(rejected_mean_logps))
    return jax.nn.log_sigmoid(log_odds), log_odds


@register
class Orpo(PairwiseObjective, ObjectiveBase):
    name = "orpo"

    @dataclasses.dataclass(frozen=True)
    class Config:
        beta: float = dataclasses.field(default=0.1, metadata=dict(above=0.0))  # λ

    def per_example(self, model, params, adapters, batch, rng):
        beta = self.config.beta
        logps, mask, auxiliary = policy_token_logps(model, params, adapters, batch, rng)
        pairs = pair_sums(logps, mask, batch)
        chosen = pairs.first / jnp.maximum(pairs.first_count, 1)
        rejected = pairs.second / jnp.maximum(pairs.second_count, 1)
        ratio, log_odds = odds_ratio_terms(chosen, rejected)
        half = logps.shape[0] // 2
        nll = -masked_mean(logps[:half], real_token_mask(batch)[:half])
        # The NLL is one number per batch (a token mean); each pair carries it so that the
        # mean over pairs is TRL's nll − mean(β·log σ).
        losses = nll - beta * ratio
        rewards = jax.lax.stop_gradient(beta * jnp.stack([chosen, rejected]))
        metrics = reward_metrics(rewards[0], rewards[1], jax.lax.stop_gradient(chosen),
                                 jax.lax.stop_gradient(rejected))
        metrics |= {"log_odds_ratio": jax.lax.stop_gradient(ratio),
                    "log_odds_chosen": jax.lax.stop_gradient(log_odds)}
        return losses, pairs.valid, metrics, {"nll_loss": jax.lax.stop_gradient(nll),
                                              **auxiliary}
