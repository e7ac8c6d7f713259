"""Orbax run checkpoints: the train state round-trips; a mismatched one is refused."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from jft.checkpointing import RunCheckpoints, base_fingerprint
from jft.errors import JftError
from jft.models import ModelConfig, RopeConfig, init_params
from jft.peft import create
from jft.train_step import init_state

MODEL = ModelConfig(
    family="llama", vocab_size=32, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=8, mlp_dim=48, norm_eps=1e-6, rope=RopeConfig(), layer_types=("full", "full"),
    dtype="float32",
)


def _state(r=4, seed=3):
    params = init_params(MODEL, jax.random.key(0))
    _, adapter = create("lora", jax.random.key(seed), params, MODEL, r=r)
    optimizer = optax.MultiSteps(optax.adamw(1e-3), every_k_schedule=2)
    return params, init_state([adapter], optimizer, seed=seed)


def test_train_state_round_trips_with_its_metadata(tmp_path):
    _, state = _state()
    state = state.__class__(**{**state.__dict__,
                                "adapters": jax.tree.map(lambda x: x + 1, state.adapters)})
    checkpoints = RunCheckpoints(tmp_path / "checkpoints", keep=2)
    for step in (1, 2, 3):
        checkpoints.save(step, state, {"data": {"epoch": 0, "position": step}},
                         state.adapters[0].delta)
    checkpoints.wait()
    assert checkpoints.manager.all_steps() == [2, 3]  # keeps the last two
    _, template = _state(seed=9)
    restored, meta = checkpoints.restore(template)
    assert meta == {"data": {"epoch": 0, "position": 3}}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    checkpoints.close()


def test_a_checkpoint_of_another_method_shape_is_refused(tmp_path):
    _, state = _state(r=4)
    checkpoints = RunCheckpoints(tmp_path / "checkpoints", keep=1)
    checkpoints.save(1, state, {}, state.adapters[0].delta)
    checkpoints.wait()
    _, other = _state(r=8)
    with pytest.raises(JftError, match="checkpoint"):
        checkpoints.restore(other)
    checkpoints.close()


def test_base_fingerprint_changes_with_the_weights():
    params = init_params(MODEL, jax.random.key(0))
    assert base_fingerprint(params) == base_fingerprint(init_params(MODEL, jax.random.key(0)))
    assert base_fingerprint(params) != base_fingerprint(init_params(MODEL, jax.random.key(1)))
