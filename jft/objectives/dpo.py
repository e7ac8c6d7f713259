"""DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023) on chosen/rejected pairs.

With Δ = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x)), summed
over completion tokens, the per-pair loss is, by `loss_type` (TRL's names):

- `sigmoid`: −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ) (ε = label_smoothing; ε > 0 is cDPO);
- `robust`: [−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)] / (1 − 2ε) (Chowdhury et al. 2024);
- `hinge`: relu(1 − βΔ) (SLiC);
- `ipo`: (Δ_avg − 1/(2β))², each log-ratio divided by its completion's token count first
  (the form the IPO authors confirmed to TRL). `objective: ipo` is DPO with this loss.

The reference is the model with the trained adapter off (no second copy of the weights),
or log-probabilities precomputed once (`precompute_reference`, `reference: DIR`).
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
    reference_token_logps,
    reward_metrics,
)

LossType = Literal["sigmoid", "robust", "hinge", "ipo"]


@dataclasses.dataclass(frozen=True)
class ReferenceOptions:
    """Where the reference log-probabilities come from (docs/preference.md)."""

    # An adapter (run directory, PEFT or jft adapter) the policy starts from and is
    # compared with (the SFT run); None: the base, i.e. the trained adapter switched off.
    reference: str | None = None
    # Compute the reference's log-probabilities once, before training, and cache them in
    # output_dir (no reference forward per step); always so with `reference` set.
    precompute_reference: bool = False


def dpo_losses(chosen_logratios, rejected_logratios, chosen_count, rejected_count, *,
               beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """The per-pair loss of each `loss_type` (see the module docstring)."""
    logits = beta * (chosen_logratios - rejected_logratios)
    eps = label_smoothing
    if loss_type == "sigmoid":
        return -(1 - eps) * jax.nn.log_sigmoid(logits) - eps * jax.nn.log_sigmoid(-logits)
    if loss_type == "robust":
        return (-(1 - eps) * jax.nn.log_sigmoid(logits)
                + eps * jax.nn.log_sigmoid(-logits)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return jax.nn.relu(1 - logits)
    if loss_type == "ipo":
        delta = (chosen_logratios / jnp.maximum(chosen_count, 1)
                 - rejected_logratios / jnp.maximum(rejected_count, 1))
        return (delta - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss_type {loss_type!r}")


@register
class Dpo(PairwiseObjective, ObjectiveBase):
    name = "dpo"
    compares_with_reference = True

    @dataclasses.dataclass(frozen=True)
    class Config(ReferenceOptions):
        beta: float = dataclasses.field(default=0.1, metadata=dict(above=0.0))
        loss_type: LossType = "sigmoid"
        label_smoothing: float = dataclasses.field(default=0.0, metadata=dict(min=0.0,
                                                                             below=0.5))

    def per_example(self, model, params, adapters, batch, rng):
        config = self.config
        logps, mask, auxiliary = policy_token_logps(model, params, adapters, batch, rng)
        policy = pair_sums(logps, mask, batch)
        reference = pair_sums(reference_token_logps(model, params, adapters, batch), mask,
                              batch)
        chosen, rejected = policy.first - reference.first, policy.second - reference.second
        losses = dpo_losses(chosen, rejected, policy.first_count, policy.second_count,
                            beta=config.beta, loss_type=config.loss_type,
                            label_smoothing=config.label_smoothing)
        rewards = jax.lax.stop_gradient(config.beta * jnp.stack([chosen, rejected]))
        metrics = reward_metrics(rewards[0], rewards[1], jax.lax.stop_gradient(policy.first),
                                 jax.lax.stop_gradient(policy.second))
        return losses, policy.valid, metrics, auxiliary


@register
class Ipo(Dpo):
    """DPO with `loss_type: ipo` (β is IPO's τ)."""

    name = "ipo"

    @dataclasses.dataclass(frozen=True)
    class Config(Dpo.Config):
        loss_type: LossType = "ipo"
