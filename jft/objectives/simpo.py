"""SimPO (Meng et al. 2024): a reference-free margin loss on length-normalised rewards.

r(y) = β · (1/|y|) · log π(y|x), and the per-pair loss is −log σ(r(y_w) − r(y_l) − γ),
with label smoothing as in TRL's CPO trainer and a `hinge` variant. The defaults are the
SimPO repository's: β = 2.0, γ/β = 0.5. `sft_weight` adds the chosen completion's mean
token NLL (the repository's option, 0 by default).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from jft.objectives.base import ObjectiveBase, register
from jft.objectives.sequences import (
    PairwiseObjective,
    pair_sums,
    policy_token_logps,
    reward_metrics,
)


def simpo_losses(chosen_mean_logps, rejected_mean_logps, *, beta: float,
                 gamma_beta_ratio: float, label_smoothing: float = 0.0,
                 loss_type: str = "sigmoid"):
    logits = beta * (chosen_mean_logps - rejected_mean_logps - gamma_beta_ratio)
    if loss_type == "hinge":
        return jax.nn.relu(1 - logits)
    return (-(1 - label_smoothing) * jax.nn.log_sigmoid(logits)
            - label_smoothing * jax.nn.log_sigmoid(-logits))


@register
class Simpo(PairwiseObjective, ObjectiveBase):
    name = "simpo"

    @dataclasses.dataclass(frozen=True)
    class Config:
        beta: float = dataclasses.field(default=2.0, metadata=dict(above=0.0))
        gamma_beta_ratio: float = dataclasses.field(default=0.5, metadata=dict(min=0.0))
        label_smoothing: float = dataclasses.field(default=0.0, metadata=dict(min=0.0,
                                                                             below=0.5))
        loss_type: Literal["sigmoid", "hinge"] = "sigmoid"
        sft_weight: float = dataclasses.field(default=0.0, metadata=dict(min=0.0))

    def per_example(self, model, params, adapters, batch, rng):
        config = self.config
        logps, mask, auxiliary = policy_token_logps(model, params, adapters, batch, rng)
        pairs = pair_sums(logps, mask, batch)
        chosen = pairs.first / jnp.maximum(pairs.first_count, 1)
        rejected = pairs.second / jnp.maximum(pairs.second_count, 1)
        losses = simpo_losses(chosen, rejected, beta=config.beta,
                              gamma_beta_ratio=config.gamma_beta_ratio,
                              label_smoothing=config.label_smoothing,
                              loss_type=config.loss_type)
        if config.sft_weight:
            losses = losses - config.sft_weight * chosen
        rewards = jax.lax.stop_gradient(config.beta * jnp.stack([chosen, rejected]))
        metrics = reward_metrics(rewards[0], rewards[1], jax.lax.stop_gradient(chosen),
                                 jax.lax.stop_gradient(rejected))
        return losses, pairs.valid, metrics, auxiliary
