"""GRPO (Shao et al. 2024, DeepSeekMath) with verifiable rewards, as TRL formulates it.

Each step samples `group_size` completions of every prompt with the current adapter
(`jft.training.rollouts`), scores them with the rewards (`jft.objectives.rewards`), and
normalises each reward within its group: A = (r − mean) / (std + 1e-4), std with
Bessel's correction (`scale_rewards: group`; `batch` uses the batch's std, `none` skips
the division, as Dr. GRPO does). The update minimises, over completion tokens,

    −min(ρ·A, clip(ρ, 1−ε, 1+ε_high)·A) + β·(exp(ref − logp) − (ref − logp) − 1)

with ρ = π(token)/π_old(token) (1 in value at a rollout's first update, its gradient that
of log π; `iterations` > 1 updates again on the same rollout, π_old the policy that
sampled it) and the KL term the k3 estimator against the reference: the base with the
adapter off. `loss_type` averages it: `grpo` over each completion's tokens, then over
completions; `bnpo` over all the batch's tokens; `dr_grpo` divides the batch's sum by
completions × max_new_tokens (Liu et al. 2025, unbiased).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jft.errors import ConfigValueError, JftError
from jft.objectives.base import ObjectiveBase, register
from jft.objectives.rewards import check_reward_names
from jft.objectives.sequences import (
    AUXILIARY,
    policy_token_logps,
    reference_adapters,
    segment_sums,
    token_logps,
)
from jft.objectives.sft import SFT

ADVANTAGE_FIELD = "advantages"  # per token: its completion's advantage
OLD_LOGPS_FIELD = "old_logps"  # per token: log-probs when sampled (optional)
STD_EPSILON = 1e-4  # TRL's


def group_advantages(rewards: np.ndarray, group_size: int, scale: str = "group") -> np.ndarray:
    """Advantages [N] of rewards [N] laid out as consecutive groups of `group_size`."""
    rewards = np.asarray(rewards, np.float64)
    grouped = rewards.reshape(-1, group_size)
    centred = (grouped - grouped.mean(1, keepdims=True)).reshape(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = grouped.std(1, ddof=1, keepdims=True) if group_size > 1 else np.zeros(
            (len(grouped), 1))
        std = np.repeat(std, group_size, axis=1).reshape(-1)
    elif scale == "batch":
        std = np.full_like(rewards, rewards.std(ddof=1) if len(rewards) > 1 else 0.0)
    else:
        raise ValueError(f"unknown scale_rewards {scale!r}")
    return centred / (std + STD_EPSILON)


def grpo_token_losses(logps, old_logps, ref_logps, advantages, *, beta: float,
                      epsilon: float, epsilon_high: float):
    """(per-token loss, per-token KL, per-token clipped) of the clipped surrogate plus β·KL."""
    ratio = jnp.exp(logps - old_logps)
    clipped = jnp.clip(ratio, 1 - epsilon, 1 + epsilon_high)
    losses = -jnp.minimum(ratio * advantages, clipped * advantages)
    kl = jnp.zeros_like(logps)
    if ref_logps is not None:
        kl = jnp.exp(ref_logps - logps) - (ref_logps - logps) - 1
        losses = losses + beta * kl
    was_clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | (
        (ratio > 1 + epsilon_high) & (advantages > 0))
    return losses, kl, was_clipped


def reduce_losses(losses, mask, batch, loss_type: str, max_new_tokens: int):
    """The scalar `loss_type` makes of per-token losses [R, T] (see the module docstring)."""
    masked = jnp.where(mask, losses, 0.0)
    if loss_type == "bnpo":
        return masked.sum() / jnp.maximum(mask.sum(), 1)
    sums = segment_sums(masked, batch)
    counts = segment_sums(mask.astype(jnp.float32), batch)
    sequences = counts > 0
    if loss_type == "dr_grpo":
        return sums.sum() / (jnp.maximum(sequences.sum(), 1) * max_new_tokens)
    per_sequence = sums / jnp.maximum(counts, 1)
    return jnp.sum(jnp.where(sequences, per_sequence, 0.0)) / jnp.maximum(sequences.sum(), 1)


def reward_names(config) -> list[str]:
    return [config.reward] if isinstance(config.reward, str) else list(config.reward)


@register
class Grpo(ObjectiveBase):
    name = "grpo"
    formats = ("prompt_completion", "chat")
    compares_with_reference = True
    samples = True

    @dataclasses.dataclass(frozen=True)
    class Config:
        group_size: int = dataclasses.field(default=8, metadata=dict(min=2))
        # Built-in `exact_match` or `regex`, or `module:function`; a list sums them
        # (weighted by reward_weights).
        reward: str | list[str] = "exact_match"
        reward_weights: list[float] | None = None
        answer_field: str | None = None  # exact_match's reference: `completion` by default
        pattern: str | None = None  # regex's pattern, matched against the completion
        max_new_tokens: int = dataclasses.field(default=64, metadata=dict(min=1))
        temperature: float = dataclasses.field(default=1.0, metadata=dict(above=0.0))
        top_k: int = dataclasses.field(default=0, metadata=dict(min=0))
        top_p: float = dataclasses.field(default=1.0, metadata=dict(above=0.0, max=1.0))
        beta: float = dataclasses.field(default=0.04, metadata=dict(min=0.0))
        epsilon: float = dataclasses.field(default=0.2, metadata=dict(above=0.0, below=1.0))
        epsilon_high: float | None = dataclasses.field(default=None, metadata=dict(above=0.0))
        loss_type: Literal["grpo", "bnpo", "dr_grpo"] = "grpo"
        scale_rewards: Literal["group", "batch", "none"] = "group"
        # Updates per rollout (TRL's num_iterations, μ): from the second on, ρ differs
        # from 1 and the clip acts.
        iterations: int = dataclasses.field(default=1, metadata=dict(min=1))

    @classmethod
    def uses_reference(cls, config) -> bool:
        return config.beta > 0

    @classmethod
    def check(cls, config) -> None:
        names = reward_names(config)
        if not names:
            raise ConfigValueError("objective.reward", "give at least one reward")
        if "regex" in names and not config.pattern:
            raise ConfigValueError("objective.pattern", "objective.reward regex needs "
                                   "objective.pattern (a regular expression the completion "
                                   "must match)")
        if config.reward_weights is not None and len(config.reward_weights) != len(names):
            raise ConfigValueError("objective.reward_weights", f"{len(config.reward_weights)} "
                                   f"weights for {len(names)} rewards")
        try:
            check_reward_names(names, config.pattern)
        except JftError as error:
            raise ConfigValueError("objective.reward", str(error)) from None

    def loss(self, model, params, adapters, batch, rng):
        config = self.config
        logps, mask, auxiliary = policy_token_logps(model, params, adapters, batch, rng)
        old = batch.get(OLD_LOGPS_FIELD, jax.lax.stop_gradient(logps))
        ref = None
        if config.beta:
            ref, _ = token_logps(model, params, reference_adapters(adapters), batch)
            ref = jax.lax.stop_gradient(ref)
        high = config.epsilon if config.epsilon_high is None else config.epsilon_high
        losses, kl, clipped = grpo_token_losses(
            logps, old, ref, batch[ADVANTAGE_FIELD], beta=config.beta,
            epsilon=config.epsilon, epsilon_high=high)
        loss = reduce_losses(losses, mask, batch, config.loss_type, config.max_new_tokens)
        loss = loss + auxiliary.pop(AUXILIARY)
        count = jnp.maximum(mask.sum(), 1)
        metrics = {"tokens": mask.sum(),
                   "kl": jnp.sum(jnp.where(mask, kl, 0.0)) / count,
                   "clip_ratio/region_mean": jnp.sum(mask & clipped) / count, **auxiliary}
        return loss, metrics

    def held_out(self, model, params, adapters, batch):
        """The reference answers' NLL (eval data is prompt-completion or chat)."""
        return SFT.held_out(model, params, adapters, batch)
