"""Per-example gradients of an adapter's trainable deltas, projected (LESS).

Each example's gradient is taken alone: `jax.vmap` of `jax.grad` over the rows of a
batch, every row one example with its own mean target loss, so a batch of B examples
gives B gradients in one compiled call (never a Python loop per example). They are
turned into the update Adam would make from a checkpoint's moments where LESS asks for
it, projected to `dim` numbers (`projection.py`), and L2-normalised; only the [B, dim]
features leave the device, a batch at a time.

A warm-up run's checkpoints are read with their optimiser state (`Checkpoint`): LESS
scores with each one, weighted by the mean learning rate of the steps that led to it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jft.errors import JftError
from jft.models import ModelConfig
from jft.objectives.sft import token_losses
from jft.peft.base import Adapter, combine, partition
from jft.select.features import example_batches
from jft.select.projection import project
from jft.training.data import TokenizedExamples

# LESS's Adam: the optimiser's betas and its epsilon inside the square root.
ADAM_EPS = 1e-8


@dataclass
class Checkpoint:
    """One adapter to take gradients of: its delta, Adam's moments at that step (None: plain
    gradients) and its weight in the sum over checkpoints."""

    adapter: Adapter
    moments: tuple | None  # (mu, nu, b1, b2): trees shaped like the trainable part
    weight: float
    step: int | None = None

    def without_moments(self) -> Checkpoint:
        """The same adapter's plain gradients (LESS's target side: SGD, not Adam)."""
        return Checkpoint(self.adapter, None, self.weight, self.step)


@partial(jax.jit, static_argnums=0)
def example_gradients(model: ModelConfig, params, adapter: Adapter, batch, moments) -> object:
    """The trainable part of `adapter`'s gradient, one per row [B, ...], as Adam would
    precondition it (LESS: m' = b1·m + (1−b1)·g, v' = b2·v + (1−b2)·g², m'/sqrt(v' + eps))
    when `moments` (mu, nu, b1, b2) are given."""
    (trainable,), (frozen,) = partition([adapter])

    def row_loss(part, row):
        one = {name: value[None] for name, value in row.items()}
        losses, mask = token_losses(model, params, combine([part], [frozen]), one)
        return jnp.sum(jnp.where(mask, losses, 0.0)) / jnp.maximum(mask.sum(), 1)

    grads = jax.vmap(jax.grad(row_loss), in_axes=(None, 0))(trainable, batch)
    if moments is None:
        return grads.delta
    mu, nu, b1, b2 = moments

    def adam(g, m, v):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        return m / jnp.sqrt(v + ADAM_EPS)

    return jax.tree.map(adam, grads.delta, mu, nu)


def gradient_features(model: ModelConfig, params, checkpoint: Checkpoint,
                      examples: TokenizedExamples, *, dim: int, seed: int, batch_size: int,
                      desc: str | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(example indices, their unit-length projected gradients [b, dim]) a batch at a time."""
    for rows, batch in example_batches(examples, batch_size, desc):
        features = _features(model, params, checkpoint.adapter, batch, checkpoint.moments,
                             dim, seed)
        yield rows, np.asarray(features)[:len(rows)]


@partial(jax.jit, static_argnums=(0, 5, 6))
def _features(model, params, adapter, batch, moments, dim, seed):
    projected = project(example_gradients(model, params, adapter, batch, moments), dim, seed)
    norms = jnp.linalg.norm(projected, axis=1, keepdims=True)
    return projected / jnp.maximum(norms, 1e-12)


# ------------------------------------------------------------------ warm-up checkpoints


def run_checkpoints(run_dir: str | os.PathLike, model: ModelConfig, params
                    ) -> list[Checkpoint]:
    """Every finished checkpoint of a `jft.train` run of a single adapter, with Adam's
    moments when it trained with AdamW, weighted by the mean learning rate of the steps
    since the previous checkpoint (LESS's η̄ᵢ), the weights summing to 1."""
    from jft.peft import get_method
    from jft.peft.optim import masked_optimizer
    from jft.training.checkpoints import RunCheckpoints, read_run_adapter
    from jft.training.config import (
        build_optimizer,
        build_schedule,
        from_dict,
        read_config_file,
        wrap_accumulation,
    )
    from jft.training.step import init_state

    run_dir = Path(run_dir)
    raw, _ = read_config_file(str(run_dir / "config.yaml"))
    raw.pop("fingerprint", None)
    config = from_dict(raw, source=str(run_dir / "config.yaml"), check_paths=False)
    # Read only; a large `keep` so that nothing could ever be pruned from the run.
    store = RunCheckpoints(run_dir / "checkpoints", keep=1_000_000)
    checkpoints = []
    try:
        steps = sorted(store.manager.all_steps())
        if not steps:
            raise JftError(f"{run_dir}/checkpoints: holds no finished checkpoint")
        schedule = build_schedule(config.train)
        rates = [float(np.mean(np.asarray(schedule(jnp.arange(start, stop)))))
                 for start, stop in zip([0, *steps[:-1]], steps, strict=True)]
        adam = config.train.optimizer == "adamw"
        for step, rate in zip(steps, rates, strict=True):
            method, method_config, delta = read_run_adapter(
                run_dir / "checkpoints" / str(step), model)
            adapter = Adapter(delta, method, method_config)
            if method != "lora" or get_method(method).rebase(params, delta, model,
                                                             method_config) is not params:
                raise JftError(f"{run_dir}: LESS takes the gradients of a LoRA adapter over "
                               "the unchanged base (not PiSSA-like inits, which rewrite it)")
            moments = None
            if adam:
                optimizer = wrap_accumulation(masked_optimizer(
                    build_optimizer(config.train, schedule=schedule), [adapter]),
                    config.train.grad_accum)
                state, _ = store.restore(init_state([adapter], optimizer, 0), step)
                moments = _adam_moments(state.opt_state, config.train)
                adapter = state.adapters[0]
            checkpoints.append(Checkpoint(adapter, moments, rate, step))
    finally:
        store.close()
    total = sum(c.weight for c in checkpoints)
    for checkpoint in checkpoints:
        checkpoint.weight = checkpoint.weight / total if total > 0 else 1 / len(checkpoints)
    return checkpoints


def _adam_moments(opt_state, train) -> tuple:
    """(mu, nu, b1, b2) of the run's AdamW state, as deltas of its one adapter."""
    found = [leaf for leaf in jax.tree.leaves(
        opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(leaf, optax.ScaleByAdamState)]
    if len(found) != 1:
        raise JftError(f"expected one Adam state in the warm-up run's optimiser, found "
                       f"{len(found)}")
    mu, nu = found[0].mu[0].delta, found[0].nu[0].delta
    b1 = 0.9 if train.beta1 is None else train.beta1
    b2 = 0.999 if train.beta2 is None else train.beta2
    return mu, nu, jnp.float32(b1), jnp.float32(b2)
