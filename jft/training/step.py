"""The training step: an objective's loss (`jft.objectives`, next-token cross-entropy by
default), gradients for the deltas' trainable leaves only, one optimiser update."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jft.models import ModelConfig, param_axes
from jft.objectives import Objective
from jft.objectives.sft import SFT
from jft.peft.base import combine, partition
from jft.peft.optim import reset_state
from jft.sharding.logical import LogicalRules, use_rules
from jft.sharding.placement import batch_shardings, put, replicated, tree_shardings


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class TrainState:
    """Everything a step updates (donated to it, so a step never doubles memory)."""

    adapters: Any  # the deltas; their trainable leaves in float32 (the master copy)
    opt_state: Any  # over the adapters' trainable part
    step: jax.Array
    rng: jax.Array
    bad_steps: jax.Array  # non-finite steps in a row
    skipped: jax.Array  # non-finite steps in total


def init_state(adapters, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    # Fresh buffers throughout: the step donates the state, and a buffer may be donated
    # only once (optimisers may share one zeros array between their moments).
    trainable, frozen = partition(adapters)
    trainable = jax.tree.map(lambda x: jnp.array(x, jnp.float32), trainable)
    adapters = combine(trainable, jax.tree.map(jnp.array, frozen))
    opt_state = jax.tree.map(jnp.copy, optimizer.init(trainable))

    def counter():
        return jnp.zeros((), jnp.int32)

    return TrainState(adapters, opt_state, counter(), jax.random.key(seed), counter(), counter())


def _train_step(model: ModelConfig, optimizer: optax.GradientTransformation, state: TrainState,
                params, batch, objective: Objective = SFT):
    """One update; a non-finite loss or gradient skips it (and is counted)."""
    rng, step_rng = jax.random.split(state.rng)
    trainable, frozen = partition(state.adapters)
    (loss, aux), grads = jax.value_and_grad(
        lambda part: objective.loss(model, params, combine(part, frozen), batch, step_rng),
        has_aux=True,
    )(trainable)
    grad_norm = optax.global_norm(grads)
    # optax.apply_if_finite counts the same, but inside the optimiser state: moving the
    # counters there would change existing runs' checkpoint layout, which could not resume.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
    updates, opt_state = optimizer.update(safe_grads, state.opt_state, trainable)
    keep = partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    state = TrainState(
        adapters=combine(keep(optax.apply_updates(trainable, updates), trainable), frozen),
        opt_state=keep(opt_state, state.opt_state),
        step=state.step + 1,
        rng=rng,
        bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
        skipped=state.skipped + (~finite).astype(jnp.int32),
    )
    metrics = {**aux, "loss": loss, "grad_norm": grad_norm, "finite": finite}
    return state, metrics


def refresh_state(model: ModelConfig, optimizer: optax.GradientTransformation,
                  state: TrainState, step: int, total_steps: int) -> TrainState:
    """After update `step`: adapters whose method reselects what it trains (SpIEL, LISA,
    HFT) do so every `refresh_every` steps, and the optimiser state of what they
    reselected starts afresh. Shapes never change, so the train step never recompiles."""
    adapters, resets, changed = list(state.adapters), [], False
    for i, adapter in enumerate(adapters):
        every = 0 if adapter.frozen else adapter.impl.refresh_every(adapter.config)
        reset = jax.tree.map(lambda _: False, adapter.delta)
        if every and step % every == 0:
            key = jax.random.fold_in(jax.random.fold_in(state.rng, step), i)
            delta, reset = adapter.impl.refresh(adapter.delta, step, total_steps, key, model,
                                                adapter.config)
            adapters[i] = adapter.with_delta(delta)
            changed = True
        resets.append(reset)
    if not changed:
        return state
    opt_state = _reset_state(optimizer, state.opt_state, adapters, resets)
    return dataclasses.replace(state, adapters=adapters, opt_state=opt_state)


@partial(jax.jit, static_argnums=0)
def _reset_state(optimizer, opt_state, adapters, resets):
    return reset_state(optimizer, opt_state, adapters, resets)


def _eval_step(model: ModelConfig, params, adapters, batch, objective: Objective = SFT):
    """(summed held-out loss, count, summed metrics) of one batch, for the eval metrics."""
    return objective.held_out(model, params, adapters, batch)


# ------------------------------------------------------------------ on a device mesh


class ShardedSteps:
    """The train and eval steps of one run on a mesh: jit with in and out shardings, the
    model traced under the run's logical-axis rules (activation constraints at block
    boundaries), and the state placed so that every array follows its base's layout."""

    def __init__(self, model: ModelConfig, optimizer: optax.GradientTransformation,
                 rules: LogicalRules, params, adapters, seed: int, objective: Objective = SFT):
        self.rules = rules
        self.params = tree_shardings(rules, params, param_axes(params))
        abstract = jax.eval_shape(lambda a: init_state(a, optimizer, seed), adapters)
        self.state = state_shardings(rules, abstract, optimizer, model)
        self.initial_state = jax.jit(lambda a: init_state(a, optimizer, seed),
                                     out_shardings=self.state)(
            put(adapters, self.state.adapters))
        self._model, self._optimizer, self._objective = model, optimizer, objective
        self._train = self._eval = self._logps = None

    def train(self, state: TrainState, params, batch):
        batch, shardings = self._place(batch)
        if self._train is None:
            self._train = self._jit(partial(_train_step, self._model, self._optimizer,
                                            objective=self._objective),
                                    (self.state, self.params, shardings),
                                    (self.state, replicated(self.rules)), donate=0)
        return self._train(state, params, batch)

    def eval(self, params, adapters, batch):
        batch, shardings = self._place(batch)
        if self._eval is None:
            self._eval = self._jit(partial(_eval_step, self._model, objective=self._objective),
                                   (self.params, self.state.adapters, shardings),
                                   replicated(self.rules))
        return self._eval(params, adapters, batch)

    def token_logps(self, params, adapters, batch):
        """Log-probability [B, T] of each token of `batch` given those before it."""
        from jft.objectives.sequences import token_logps

        batch, shardings = self._place(batch)
        if self._logps is None:
            self._logps = self._jit(
                lambda p, a, b: token_logps(self._model, p, a, b)[0],
                (self.params, self.state.adapters, shardings), replicated(self.rules))
        return self._logps(params, adapters, batch)

    def replace(self, state: TrainState) -> TrainState:
        """`state` back in its layout (after a refresh computed outside the step)."""
        return put(state, self.state)

    def _place(self, batch):
        shardings = batch_shardings(self.rules, batch)
        return put(dict(batch), shardings), shardings

    def _jit(self, fn, in_shardings, out_shardings, donate=()):
        rules = self.rules

        def traced(*args):
            with use_rules(rules):
                return fn(*args)

        return jax.jit(traced, in_shardings=in_shardings, out_shardings=out_shardings,
                       donate_argnums=donate)


def state_shardings(rules: LogicalRules, state: TrainState, optimizer, model: ModelConfig
                    ) -> TrainState:
    """Shardings for a (possibly abstract) TrainState: each delta leaf by its method's
    `delta_axes`, optimiser moments like the trainable leaf they track (factored
    moments, whose shapes differ, replicated), counters and the RNG replicated."""
    everywhere = replicated(rules)
    adapters = [
        a.with_delta(tree_shardings(rules, a.delta,
                                    a.impl.delta_axes(a.delta, model, a.config),
                                    f"{a.method} delta "))
        for a in state.adapters
    ]
    placed = jax.tree.map(_Placed, partition(adapters)[0], partition(state.adapters)[0])

    def is_leaf(x):
        return x is None or isinstance(x, optax.MaskedNode)

    def moment(leaf, place):
        if is_leaf(leaf) or place is None:
            return leaf
        return place.sharding if leaf.shape == place.shape else everywhere

    opt_state = optax.tree_utils.tree_map_params(
        optimizer, moment, state.opt_state, placed,
        transform_non_params=lambda x: x if is_leaf(x) else everywhere, is_leaf=is_leaf)
    return TrainState(adapters, opt_state, everywhere, everywhere, everywhere, everywhere)


class _Placed:
    """A trainable leaf's sharding and shape (one pytree leaf, not a node)."""

    def __init__(self, sharding, leaf):
        self.sharding, self.shape = sharding, leaf.shape
