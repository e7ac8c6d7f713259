"""The training step: overfitting, packed = unpacked losses, the NaN guard, accumulation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jft.models import ModelConfig, RopeConfig, RuntimePolicy, init_params
from jft.objectives.sft import example_losses
from jft.peft import create
from tests.steps import one_device_steps

MODEL = ModelConfig(
    family="llama", vocab_size=48, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16, mlp_dim=128, norm_eps=1e-6, rope=RopeConfig(), layer_types=("full", "full"),
    policy=RuntimePolicy(dtype="float32"),
)


@pytest.fixture(scope="module")
def params():
    return init_params(MODEL, jax.random.key(0), std=0.1)


def _row(examples, length, completion_from=1):
    """One packed row: examples back to back, segment ids, positions, targets after the
    first `completion_from` tokens of each example."""
    tokens, segments, positions, mask = [], [], [], []
    for i, example in enumerate(examples, start=1):
        tokens += example
        segments += [i] * len(example)
        positions += list(range(len(example)))
        mask += [t >= completion_from for t in range(len(example))]
    pad = length - len(tokens)
    return {
        "tokens": np.array(tokens + [0] * pad, np.int32),
        "segment_ids": np.array(segments + [0] * pad, np.int32),
        "positions": np.array(positions + [0] * pad, np.int32),
        "loss_mask": np.array(mask + [False] * pad, bool),
    }


def _batch(rows):
    return {key: jnp.asarray(np.stack([r[key] for r in rows])) for key in rows[0]}


EXAMPLES = [list(np.random.default_rng(i).integers(1, 48, size=n)) for i, n in
            enumerate((7, 5, 9, 6))]


def test_lora_overfits_a_tiny_dataset(params):
    base, adapter = create("lora", jax.random.key(1), params, MODEL, r=16, alpha=32,
                           targets="all-linear")
    steps = one_device_steps(MODEL, optax.adam(1e-2), base, [adapter])
    state = steps.initial_state
    batch = _batch([_row(EXAMPLES[:2], 16), _row(EXAMPLES[2:], 16)])
    losses = []
    for _ in range(60):
        state, metrics = steps.train(state, base, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.1 * losses[0], losses[::10]


def test_packed_and_unpacked_batches_give_the_same_per_example_losses(params):
    _, adapter = create("lora", jax.random.key(1), params, MODEL, r=4, targets="all-linear")
    adapter = jax.tree.map(lambda x: x + 0.1, adapter)
    packed = _batch([_row(EXAMPLES[:2], 16), _row(EXAMPLES[2:], 16)])
    unpacked = _batch([_row([example], 16) for example in EXAMPLES])
    packed_losses = np.asarray(example_losses(MODEL, params, [adapter], packed))
    unpacked_losses = np.asarray(example_losses(MODEL, params, [adapter], unpacked))
    np.testing.assert_allclose(packed_losses.reshape(-1), unpacked_losses[:, 0], atol=1e-5)


def test_non_finite_steps_are_skipped_and_counted(params):
    _, adapter = create("lora", jax.random.key(1), params, MODEL, r=4)
    steps = one_device_steps(MODEL, optax.adam(1e-2), params, [adapter])
    state = steps.initial_state
    batch = _batch([_row(EXAMPLES[:2], 16)])
    poisoned = dict(params, embed=params["embed"].at[EXAMPLES[0][0]].set(jnp.nan))
    before = jax.tree.map(np.array, state.adapters)  # copies: the step donates the state
    state, metrics = steps.train(state, poisoned, batch)
    assert not bool(metrics["finite"]) and int(state.bad_steps) == 1 and int(state.skipped) == 1
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(state.adapters), strict=True):
        np.testing.assert_array_equal(old, np.asarray(new))
    state, metrics = steps.train(state, params, batch)
    assert bool(metrics["finite"]) and int(state.bad_steps) == 0 and int(state.skipped) == 1


def test_two_accumulated_half_batches_equal_one_full_batch(params):
    _, adapter = create("lora", jax.random.key(1), params, MODEL, r=4, targets="all-linear")
    adapter = jax.tree.map(lambda x: x + 0.1, adapter)
    # Equal target counts, so the mean of the two halves' means is the full batch's mean.
    rows = [_row([example], 12) for example in (EXAMPLES[0], EXAMPLES[0][::-1])]
    sgd = optax.sgd(0.5)
    full_steps = one_device_steps(MODEL, sgd, params, [adapter])
    full, _ = full_steps.train(full_steps.initial_state, params, _batch(rows))
    accumulated_steps = one_device_steps(MODEL, optax.MultiSteps(sgd, every_k_schedule=2),
                                         params, [adapter])
    accumulated = accumulated_steps.initial_state
    for row in rows:
        accumulated, _ = accumulated_steps.train(accumulated, params, _batch([row]))
    for a, b in zip(jax.tree.leaves(full.adapters), jax.tree.leaves(accumulated.adapters),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_chunked_loss_equals_whole_sequence_loss_and_gradients(params, monkeypatch, method):
    """Logits computed 8 positions at a time (29 positions: ragged last chunk) give the
    loss and gradients of the whole [B, T, V] logits at once."""
    from jft.models import forward
    from jft.objectives import sft
    from jft.peft.base import combine, partition

    base, adapter = create(method, jax.random.key(1), params, MODEL,
                           **({"r": 4, "targets": "all-linear"} if method == "lora" else {}))
    if method == "lora":  # B = 0 would hide errors in A's gradient
        adapter = dataclasses.replace(adapter, delta=jax.tree.map(lambda x: x + 0.05,
                                                                   adapter.delta))
    batch = _batch([_row(EXAMPLES[:2], 30), _row(EXAMPLES[2:], 30)])
    trainable, frozen = partition([adapter])

    def whole(part):  # the reference: optax on the full logits
        logits = forward(MODEL, base, batch["tokens"], batch["positions"],
                         batch["segment_ids"], adapters=combine(part, frozen))
        losses = optax.softmax_cross_entropy_with_integer_labels(
            logits[:, :-1], batch["tokens"][:, 1:])
        _, mask = sft.token_losses(MODEL, base, combine(part, frozen), batch)
        return jnp.sum(jnp.where(mask[:, 1:], losses, 0)) / mask.sum()

    def chunked(part):
        return sft.mean_loss(MODEL, base, combine(part, frozen), batch)[0]

    # 8-position chunks: 2 rows x 48 vocab x 4 bytes x 8.
    monkeypatch.setattr(sft, "LOSS_CHUNK_BYTES", 2 * 48 * 4 * 8)
    loss, grads = jax.value_and_grad(chunked)(trainable)
    jaxpr = str(jax.make_jaxpr(chunked)(trainable))
    assert "f32[2,8,48]" in jaxpr and "f32[2,29,48]" not in jaxpr
    expected, expected_grads = jax.value_and_grad(whole)(trainable)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


class _DistillToBase:
    """A test objective with what DPO-like objectives need: a second forward pass with the
    adapters off (the reference) and an extra batch field (per-row weights)."""

    name = "test_distill_to_base"

    def loss(self, model, params, adapters, batch, rng):
        from jft.models import forward

        tuned = forward(model, params, batch["tokens"], adapters=adapters)
        reference = jax.lax.stop_gradient(forward(model, params, batch["tokens"]))
        per_row = jnp.mean((tuned - reference) ** 2, axis=(1, 2))
        return jnp.sum(batch["row_weight"] * per_row), {"reference_mean": reference.mean()}

    def held_out(self, model, params, adapters, batch):
        loss, _ = self.loss(model, params, adapters, batch, None)
        return loss, jnp.asarray(1), {}


def test_sharded_steps_train_any_objective_with_extra_batch_fields(params):
    from jft.models import forward
    from jft.peft.optim import masked_optimizer

    base, adapter = create("lora", jax.random.key(1), params, MODEL, r=4)
    adapter = dataclasses.replace(adapter, delta=jax.tree.map(lambda x: x + 0.05,
                                                               adapter.delta))
    batch = dict(_batch([_row(EXAMPLES[:2], 16), _row(EXAMPLES[2:], 16)]))
    batch["row_weight"] = jnp.asarray([1.0, 3.0])
    optimizer = masked_optimizer(optax.sgd(0.1), [adapter])
    steps = one_device_steps(MODEL, optimizer, base, [adapter], objective=_DistillToBase())
    state, metrics = steps.train(steps.initial_state, base, batch)

    tuned = np.asarray(forward(MODEL, base, batch["tokens"], adapters=[adapter]))
    reference = np.asarray(forward(MODEL, base, batch["tokens"]))
    expected = np.sum(np.array([1.0, 3.0]) * ((tuned - reference) ** 2).mean(axis=(1, 2)))
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["reference_mean"]), reference.mean(), rtol=1e-5)
    loss_sum, count, _ = steps.eval(base, state.adapters, batch)
    assert int(count) == 1 and float(loss_sum) < expected  # one SGD step moved towards base
