"""LISA and HFT: the gated matmul's gradients, identity at init, real train steps that
update exactly the active layers (LISA) or half of each category (HFT), switches that
write back, reselect and restart the optimiser state without recompiling, gradients
equal to full fine-tuning's on the active slices, and bad options."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jft.errors import JftError
from jft.models import ModelConfig, RopeConfig, RuntimePolicy, forward
from jft.objectives.sft import mean_loss
from jft.peft import create, hft, lisa, make_config
from jft.peft.active_layers import gated_matmul
from jft.peft.base import combine, partition
from jft.peft.optim import masked_optimizer
from jft.training.step import refresh_state
from tests.hf_reference import random_params
from tests.steps import SftTracedOnce, one_device_steps

# Untied head, qkv biases, q/k norms and post norms: every kind of layer param. Five
# layers: HFT's modules then get padding slots (3 slots, some used by 2 layers only).
MODEL = ModelConfig(
    family="qwen3", vocab_size=32, embed_dim=16, num_layers=5, num_heads=4, num_kv_heads=2,
    head_dim=4, mlp_dim=24, norm_eps=1e-6, rope=RopeConfig(), layer_types=("full",) * 5,
    qkv_bias=True, qk_norm=True, post_norms=True, policy=RuntimePolicy(dtype="float32"),
)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
_logits = jax.jit(forward, static_argnums=0)


def _batch(seed=0, batch=2, length=8):
    rng = np.random.default_rng(seed)
    return {
        "tokens": jnp.asarray(rng.integers(0, MODEL.vocab_size, (batch, length)), jnp.int32),
        "segment_ids": jnp.ones((batch, length), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)),
        "loss_mask": jnp.ones((batch, length), bool),
    }


@pytest.fixture(scope="module")
def base():
    return random_params(MODEL)


def _changed_layers(before, after) -> dict[str, set[int]]:
    """For each layer param, the layers whose values differ."""
    return {name: {i for i in range(MODEL.num_layers)
                   if not np.array_equal(np.asarray(before["layers"][name][i]),
                                         np.asarray(after["layers"][name][i]))}
            for name in before["layers"]}


def _moments(opt_state, leaf: str) -> list[np.ndarray]:
    """Adam's mu and nu entries of the delta leaves whose path names `leaf`."""
    out = []
    for path, value in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        text = jax.tree_util.keystr(path)
        if f"'{leaf}'" in text and ("mu" in text or "nu" in text):
            out.append(np.asarray(value))
    assert out, f"no optimiser state for {leaf}"
    return out


# ---------------------------------------------------------------- the gated matmul


@pytest.mark.parametrize("hit", [True, False])
@pytest.mark.parametrize("equation,x_shape,w_shape", [
    ("BTD,DNH->BTNH", (2, 3, 5), (5, 2, 4)),
    ("BTNH,NHD->BTD", (2, 3, 2, 4), (2, 4, 5)),
])
def test_gated_matmul_gradients_equal_autodiff_of_the_masked_matmul(hit, equation, x_shape,
                                                                    w_shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    parked = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
    active = jnp.asarray(rng.standard_normal((3, *w_shape)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal(jnp.einsum(equation, x, parked).shape))
    slot, hit = jnp.int32(1), jnp.bool_(hit)

    def gated(x, active):
        return jnp.vdot(gated_matmul(equation, x, parked, active, hit, slot), cotangent)

    def masked(x, active):
        return jnp.vdot(jnp.einsum(equation, x, jnp.where(hit, active[slot], parked)), cotangent)

    np.testing.assert_allclose(gated(x, active), masked(x, active), rtol=1e-6)
    got, want = jax.grad(gated, (0, 1))(x, active), jax.grad(masked, (0, 1))(x, active)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
    assert np.any(np.asarray(got[1])) == bool(hit)


# ---------------------------------------------------------------- identity and layout


@pytest.mark.parametrize("method,options,dtype", [
    ("lisa", {"activated_layers": 2}, "float32"),
    ("hft", {}, "float32"),
    ("lisa", {"activated_layers": 3}, "bfloat16"),  # params and activations
])
def test_fresh_adapter_leaves_the_forward_unchanged(base, method, options, dtype):
    model = MODEL.replace(dtype=dtype)
    base = jax.tree.map(lambda x: x.astype(dtype), base)
    rebased, adapter = create(method, jax.random.key(0), base, model, **options)
    parked = adapter.delta["parked"]
    assert not any(name in rebased["layers"] for name in parked)  # the delta holds them
    assert all(parked[name] is base["layers"][name] for name in parked)  # not copied
    tokens = _batch()["tokens"]
    expected = np.asarray(_logits(model, base, tokens))
    for params in (rebased, base):
        np.testing.assert_array_equal(np.asarray(_logits(model, params, tokens,
                                                         adapters=[adapter])), expected)
    merged = adapter.impl.merge(rebased, adapter.delta, model, adapter.config)
    for want, got in zip(jax.tree.leaves(base), jax.tree.leaves(merged), strict=True):
        assert want.dtype == got.dtype
        np.testing.assert_array_equal(np.asarray(want.astype(jnp.float32)),
                                      np.asarray(got.astype(jnp.float32)))


def test_hft_rounds_train_half_of_each_category(base):
    for layers in (1, 3, 4, 5, 7, 12):
        model = MODEL.replace(num_layers=layers, layer_types=("full",) * layers)
        for seed in range(3):
            chosen = hft.select_round(jax.random.key(seed), layers)
            sets = {m: set(np.asarray(v).tolist()) - {-1} for m, v in chosen.items()}
            for m, v in chosen.items():  # sorted, distinct, padded to the static capacity
                assert v.shape == (hft.capacity(layers)[m],)
                assert len(sets[m]) == int(np.sum(np.asarray(v) >= 0))
            per_layer_attention = [sum(i in sets[m] for m in ATTENTION) for i in range(layers)]
            per_layer_ffn = sorted(sum(i in sets[m] for m in FFN) for i in range(layers))
            assert per_layer_attention == [2] * layers
            assert per_layer_ffn == [1] * (layers // 2) + [2] * (layers - layers // 2)
        if layers == MODEL.num_layers:
            delta = hft.HFT.init(jax.random.key(0), base, model, hft.HftConfig())
            want = sum(int(np.sum(np.asarray(v) >= 0)) * np.prod(base["layers"][m].shape[1:])
                       for m, v in delta["active_layers"].items())
            assert hft.HFT.num_params(delta, model, hft.HftConfig()) == want


def test_lisa_counts_the_active_layers_and_the_always_trained_params(base):
    config = lisa.LisaConfig(activated_layers=3)
    delta = lisa.LISA.init(jax.random.key(0), base, MODEL, config)
    per_layer = sum(np.prod(w.shape[1:]) for w in base["layers"].values())
    top = sum(base[k].size for k in ("embed", "lm_head", "final_norm"))
    assert lisa.LISA.num_params(delta, MODEL, config) == 3 * per_layer + top
    assert len(set(np.asarray(delta["active_layers"]).tolist())) == 3


# ---------------------------------------------------------------- training


def _snapshot(state):
    return jax.tree.map(np.array, state.adapters[0].delta)


def test_lisa_trains_only_its_active_layers_and_switches_without_recompiling(base):
    rebased, adapter = create("lisa", jax.random.key(3), base, MODEL, activated_layers=2,
                              interval_steps=3)
    optimizer = masked_optimizer(optax.adam(1e-2), [adapter])
    # The step raises if it is traced again: switches must not recompile it.
    steps = one_device_steps(MODEL, optimizer, rebased, [adapter], objective=SftTracedOnce())
    state = steps.initial_state
    impl, config = adapter.impl, adapter.config
    for step in (1, 2, 3):
        state, _ = steps.train(state, rebased, _batch(step))
    before = _snapshot(state)
    first = set(before["active_layers"].tolist())
    merged = impl.merge(base, state.adapters[0].delta, MODEL, config)
    assert all(changed == first for changed in _changed_layers(base, merged).values())
    for name in ("embed", "lm_head", "final_norm"):
        assert not np.array_equal(np.asarray(merged[name]), np.asarray(base[name]))

    state = steps.replace(refresh_state(MODEL, optimizer, state, 3, 10))  # a switch step
    after = _snapshot(state)
    second = after["active_layers"].tolist()
    assert set(second) != first
    for name, active in before["active"].items():
        for slot, layer in enumerate(before["active_layers"]):  # written back
            np.testing.assert_array_equal(after["parked"][name][layer], active[slot])
        for slot, layer in enumerate(second):  # gathered afresh
            np.testing.assert_array_equal(after["active"][name][slot],
                                          after["parked"][name][layer])
    assert all(not m.any() for m in _moments(state.opt_state, "active"))
    assert all(m.any() for m in _moments(state.opt_state, "embed"))  # always trained: kept

    for step in (4, 5):
        state, _ = steps.train(state, rebased, _batch(step))
        state = steps.replace(refresh_state(MODEL, optimizer, state, step, 10))
    merged_again = impl.merge(base, state.adapters[0].delta, MODEL, config)
    changed = _changed_layers(merged, merged_again)
    assert all(layers == set(second) for layers in changed.values())


def test_hft_trains_half_of_each_category_per_round_without_recompiling(base):
    rebased, adapter = create("hft", jax.random.key(3), base, MODEL, interval_steps=2)
    optimizer = masked_optimizer(optax.adam(1e-2), [adapter])
    assert _state_leaves(optimizer, adapter) == ["active"]  # half the linears, nothing else
    # The step raises if it is traced again: new rounds must not recompile it.
    steps = one_device_steps(MODEL, optimizer, rebased, [adapter], objective=SftTracedOnce())
    state = steps.initial_state
    impl, config = adapter.impl, adapter.config
    previous, rounds = base, []
    for round_start in (1, 3):
        for step in (round_start, round_start + 1):
            state, _ = steps.train(state, rebased, _batch(step))
            snapshot = _snapshot(state)
            state = steps.replace(refresh_state(MODEL, optimizer, state, step, 10))
        merged = impl.merge(base, state.adapters[0].delta, MODEL, config)
        changed = _changed_layers(previous, merged)
        chosen = {m: set(v.tolist()) - {-1} for m, v in snapshot["active_layers"].items()}
        assert {m: changed[m] for m in chosen} == chosen
        assert not any(changed[name] for name in changed if name not in chosen)  # norms, biases
        assert [sum(i in chosen[m] for m in ATTENTION) for i in range(5)] == [2] * 5
        assert sorted(sum(i in chosen[m] for m in FFN) for i in range(5)) == [1, 1, 2, 2, 2]
        for name in ("embed", "lm_head", "final_norm"):
            assert np.array_equal(np.asarray(merged[name]), np.asarray(base[name]))
        rounds.append(chosen)
        previous = merged
    assert rounds[0] != rounds[1]
    assert all(not m.any() for m in _moments(state.opt_state, "active"))  # restarted


def _state_leaves(optimizer, adapter):
    """The top-level delta entries the optimiser keeps state for."""
    trainable = partition([adapter])[0]
    state = optimizer.init(trainable)
    names = set()
    for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]:
        keys = [getattr(k, "key", None) for k in path]
        names |= {k for k in keys if k in adapter.delta}
    return sorted(names)


# ---------------------------------------------------------------- gradients


@jax.jit
@jax.grad
def _adapter_grad(trainable, frozen, params, batch):
    return mean_loss(MODEL, params, combine(trainable, frozen), batch)[0]


@jax.jit
@jax.grad
def _full_grad(params, batch):
    return mean_loss(MODEL, params, [], batch)[0]


@pytest.mark.parametrize("method,options", [
    ("lisa", {"activated_layers": 2}),
    ("hft", {}),
])
def test_active_gradients_equal_full_fine_tuning_on_those_layers(base, method, options):
    rebased, adapter = create(method, jax.random.key(5), base, MODEL, **options)
    batch = _batch(7)
    trainable, frozen = partition([adapter])
    grads = _adapter_grad(trainable, frozen, rebased, batch)[0].delta
    if method == "hft":
        assert any(-1 in np.asarray(v).tolist() for v in adapter.delta["active_layers"].values())
    full = _full_grad(base, batch)
    top = ("embed", "lm_head", "final_norm") if method == "lisa" else ()
    assert {k for k, v in grads.items() if jax.tree.leaves(v)} == {"active", *top}
    for name, grad in grads["active"].items():
        layers = np.asarray(_active_layers(adapter.delta, name))
        for slot, layer in enumerate(layers):
            want = full["layers"][name][layer] if layer >= 0 else jnp.zeros_like(grad[slot])
            np.testing.assert_allclose(np.asarray(grad[slot]), np.asarray(want),
                                       rtol=1e-4, atol=1e-6)
    for name in top:
        np.testing.assert_allclose(np.asarray(grads[name]), np.asarray(full[name]),
                                   rtol=1e-4, atol=1e-6)


def _active_layers(delta, name):
    layers = delta["active_layers"]
    return layers[name] if isinstance(layers, dict) else layers


# ---------------------------------------------------------------- bad options


@pytest.mark.parametrize("method,options,named", [
    ("lisa", {"activated_layers": 0}, "activated_layers"),
    ("lisa", {"activated_layers": 6}, "activated_layers"),  # the model has 5 layers
    ("lisa", {"interval_steps": 0}, "interval_steps"),
    ("lisa", {"interval_steps": 2.5}, "interval_steps"),
    ("hft", {"interval_steps": -1}, "interval_steps"),
    ("hft", {"ratio": 0.5}, "ratio"),
])
def test_bad_options_name_the_option(base, method, options, named):
    with pytest.raises(JftError, match=named):
        create(method, jax.random.key(0), base, MODEL, **options)
    if options != {"activated_layers": 6}:  # the others fail without a model too
        with pytest.raises(JftError, match=named):
            make_config(method, options)
