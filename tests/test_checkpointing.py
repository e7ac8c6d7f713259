"""Orbax run checkpoints: the train state round-trips; a mismatched one is refused."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from jft.errors import JftError
from jft.formats.adapters import load_adapter
from jft.formats.jft_adapter import architecture
from jft.models import ModelConfig, RopeConfig, RuntimePolicy, init_params
from jft.peft import create
from jft.peft.factory import config_to_options
from jft.training.checkpoints import RunCheckpoints, base_fingerprint
from jft.training.step import init_state

MODEL = ModelConfig(
    family="llama", vocab_size=32, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=8, mlp_dim=48, norm_eps=1e-6, rope=RopeConfig(), layer_types=("full", "full"),
    policy=RuntimePolicy(dtype="float32"),
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
        checkpoints.save(step, state, {"data": {"epoch": 0, "position": step}})
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
    checkpoints.save(1, state, {})
    checkpoints.wait()
    _, other = _state(r=8)
    with pytest.raises(JftError, match="checkpoint"):
        checkpoints.restore(other)
    checkpoints.close()


def test_base_fingerprint_changes_with_the_weights():
    params = init_params(MODEL, jax.random.key(0))
    assert base_fingerprint(params) == base_fingerprint(init_params(MODEL, jax.random.key(0)))
    assert base_fingerprint(params) != base_fingerprint(init_params(MODEL, jax.random.key(1)))


def _meta(adapter):
    return {"method": adapter.method, "options": config_to_options(adapter.config),
            "architecture": architecture(MODEL)}


def _directory_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_full_fine_tuning_checkpoint_holds_the_weights_once(tmp_path):
    params = init_params(MODEL, jax.random.key(0))
    _, adapter = create("full", jax.random.key(1), params, MODEL)
    state = init_state([adapter], optax.adamw(1e-3), seed=0)
    rng = np.random.default_rng(0)  # random values: Orbax compresses, zeros would vanish

    def noise(tree):
        return jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(x.dtype), tree)

    state = state.__class__(**{**state.__dict__, "adapters": noise(state.adapters),
                                "opt_state": noise(state.opt_state)})
    checkpoints = RunCheckpoints(tmp_path / "checkpoints", keep=1)
    checkpoints.save(1, state, _meta(adapter))
    checkpoints.close()
    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    # The weights (float32 master copy) and Adam's two moments: three copies, not four.
    size = _directory_bytes(tmp_path / "checkpoints")
    assert 2.9 * weights < size < 3.4 * weights, size / weights
    _, (loaded,) = load_adapter(tmp_path, params, MODEL)
    for a, b in zip(jax.tree.leaves(state.adapters[0].delta), jax.tree.leaves(loaded.delta),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_run_saved_with_a_separate_adapter_copy_still_loads(tmp_path):
    import orbax.checkpoint as ocp

    params, state = _state()
    adapter = state.adapters[0]
    delta = jax.tree.map(lambda x: x + 1, adapter.delta)
    manager = ocp.CheckpointManager(tmp_path / "checkpoints",
                                    options=ocp.CheckpointManagerOptions(create=True))
    manager.save(1, args=ocp.args.Composite(  # the layout runs had before
        state=ocp.args.StandardSave({".step": np.zeros((), np.int32)}),
        meta=ocp.args.JsonSave(_meta(adapter)), adapter=ocp.args.StandardSave(delta)))
    manager.close()
    _, (loaded,) = load_adapter(tmp_path, params, MODEL)
    for a, b in zip(jax.tree.leaves(delta), jax.tree.leaves(loaded.delta), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
