"""The training step: next-token loss on target tokens, gradients for the deltas only.

A batch is a dict of [B, T] arrays (see `jft.data`): `tokens`, `segment_ids` (0 =
padding), `positions`, and `loss_mask` (True where the token is a training target).
Token t is predicted from the positions before it in the same segment, so the first
token of every example is never a target, and packed examples never see each other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jft.models import ModelConfig, forward, output_logits, param_axes
from jft.peft.base import Adapter, combine, partition
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


# The float32 logits of one loss chunk stay under this many bytes: at Llama 3's 128k
# vocabulary the logits of one 8k-token row alone are 4 GiB, and their gradient as much.
LOSS_CHUNK_BYTES = 256 * 2**20


def token_losses(model: ModelConfig, params, adapters, batch, rng=None):
    """Per-token cross-entropy [B, T] and the target mask [B, T] (position 0 never counts)."""
    hidden, head = forward(model, params, batch["tokens"], batch["positions"],
                           batch["segment_ids"], adapters=adapters, rng=rng, return_hidden=True)
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
    losses, mask = token_losses(model, params, adapters, batch, rng)
    count = jnp.maximum(mask.sum(), 1)
    return jnp.sum(jnp.where(mask, losses, 0.0)) / count, count


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


def _train_step(model: ModelConfig, optimizer: optax.GradientTransformation, state: TrainState,
                params, batch):
    """One update; a non-finite loss or gradient skips it (and is counted)."""
    rng, step_rng = jax.random.split(state.rng)
    trainable, frozen = partition(state.adapters)
    (loss, count), grads = jax.value_and_grad(
        lambda part: mean_loss(model, params, combine(part, frozen), batch, step_rng),
        has_aux=True,
    )(trainable)
    grad_norm = optax.global_norm(grads)
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
    metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count, "finite": finite}
    return state, metrics


train_step = jax.jit(_train_step, static_argnums=(0, 1), donate_argnums=2)


def refresh_state(model: ModelConfig, optimizer: optax.GradientTransformation,
                  state: TrainState, step: int, total_steps: int) -> TrainState:
    """After update `step`: adapters whose method reselects what it trains (SpIEL, LISA,
    HFT) do so every `refresh_every` steps, and the optimiser state of what they
    reselected starts afresh. Shapes never change, so the train step never recompiles."""
    adapters, resets, changed = list(state.adapters), [], False
    for i, adapter in enumerate(adapters):
        every = adapter.impl.refresh_every(adapter.config)
        reset = jax.tree.map(lambda _: False, adapter.delta)
        if every and step % every == 0:
            key = jax.random.fold_in(jax.random.fold_in(state.rng, step), i)
            delta, reset = adapter.impl.refresh(adapter.delta, step, total_steps, key, model,
                                                adapter.config)
            adapters[i] = Adapter(delta, adapter.method, adapter.config)
            changed = True
        resets.append(reset)
    if not changed:
        return state
    opt_state = _reset_state(optimizer, state.opt_state, adapters, resets)
    return dataclasses.replace(state, adapters=adapters, opt_state=opt_state)


@partial(jax.jit, static_argnums=0)
def _reset_state(optimizer, opt_state, adapters, resets):
    return reset_state(optimizer, opt_state, adapters, resets)


def _eval_step(model: ModelConfig, params, adapters, batch):
    """(summed target loss, target count) of one batch, for held-out loss and perplexity."""
    losses, mask = token_losses(model, params, adapters, batch)
    return jnp.sum(jnp.where(mask, losses, 0.0)), mask.sum()


eval_step = jax.jit(_eval_step, static_argnums=0)


# ------------------------------------------------------------------ on a device mesh


class ShardedSteps:
    """The train and eval steps of one run on a mesh: jit with in and out shardings, the
    model traced under the run's logical-axis rules (activation constraints at block
    boundaries), and the state placed so that every array follows its base's layout."""

    def __init__(self, model: ModelConfig, optimizer: optax.GradientTransformation,
                 rules: LogicalRules, params, adapters, seed: int):
        self.rules = rules
        self.params = tree_shardings(rules, params, param_axes(params))
        abstract = jax.eval_shape(lambda a: init_state(a, optimizer, seed), adapters)
        self.state = state_shardings(rules, abstract, optimizer, model)
        self.initial_state = jax.jit(lambda a: init_state(a, optimizer, seed),
                                     out_shardings=self.state)(
            put(adapters, self.state.adapters))
        self._model, self._optimizer = model, optimizer
        self._train = self._eval = None

    def train(self, state: TrainState, params, batch):
        batch, shardings = self._place(batch)
        if self._train is None:
            self._train = self._jit(partial(_train_step, self._model, self._optimizer),
                                    (self.state, self.params, shardings),
                                    (self.state, replicated(self.rules)), donate=0)
        return self._train(state, params, batch)

    def eval(self, params, adapters, batch):
        batch, shardings = self._place(batch)
        if self._eval is None:
            self._eval = self._jit(partial(_eval_step, self._model),
                                   (self.params, self.state.adapters, shardings),
                                   replicated(self.rules))
        return self._eval(params, adapters, batch)

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
        Adapter(tree_shardings(rules, a.delta, a.impl.delta_axes(a.delta, model, a.config),
                               f"{a.method} delta "), a.method, a.config)
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
