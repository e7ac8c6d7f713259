"""SpIEL: the sparse delta against a dense numpy W + S, its gradients against dense autodiff,
regrowth through real train steps (drop/grow choice, optimiser-state resets, no
recompiles), the entry-count options, and exact merges."""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jft.errors import JftError
from jft.models import ModelConfig, RopeConfig, RuntimePolicy, forward, param_shapes
from jft.objectives.sft import mean_loss
from jft.peft import Adapter, Targets, make_config, spiel
from jft.peft.base import combine, partition
from jft.peft.optim import masked_optimizer
from jft.training.step import refresh_state
from tests.steps import SftTracedOnce, one_device_steps

MODEL = ModelConfig(
    family="llama", vocab_size=32, embed_dim=16, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=4, mlp_dim=24, norm_eps=1e-6, rope=RopeConfig(), layer_types=("full", "full"),
    policy=RuntimePolicy(dtype="float32"),
)
# One layer's weight entries, from the shapes in models/transformer.py.
SIZES = {"q_proj": 16 * 4 * 4, "k_proj": 16 * 2 * 4, "v_proj": 16 * 2 * 4,
         "o_proj": 4 * 4 * 16, "gate_proj": 16 * 24, "up_proj": 16 * 24, "down_proj": 24 * 16}
ALL_LAYERS = {m: (True, True) for m in SIZES}
SOME_MODULES = ("q_proj", "o_proj", "down_proj")
SOME_LAYERS = {m: (False, True) for m in SOME_MODULES}  # layers_to_transform=[1]
ALL = spiel.SpielConfig(count=6)
SOME = spiel.SpielConfig(targets=Targets(SOME_MODULES, (1,)), count=6)
KEY = jax.random.key(0)
TOKENS = np.random.default_rng(0).integers(0, 32, size=(2, 7))

_logits = jax.jit(forward, static_argnums=0)


@pytest.fixture(scope="module")
def base():
    rng = np.random.default_rng(0)

    def leaf(path, shape):
        noise = 0.3 * rng.standard_normal(shape)
        return jnp.asarray(noise + (1.0 if path[-1].key.endswith("norm") else 0.0), jnp.float32)

    return jax.tree.map_with_path(leaf, param_shapes(MODEL),
                                  is_leaf=lambda x: isinstance(x, tuple))


def _randomised(delta, seed=1):
    """values and candidate_grads moved by N(0, 0.3) noise; positions untouched."""
    rng = np.random.default_rng(seed)
    return {"layers": {m: dict(e, values=e["values"] + 0.3 * rng.standard_normal(
        e["values"].shape).astype(np.float32), candidate_grads=e["candidate_grads"]
        + rng.standard_normal(e["candidate_grads"].shape).astype(np.float32))
        for m, e in delta["layers"].items()}}


def _dense(base, delta, active):
    """The base with each targeted layer's values added at their flat indices (numpy)."""
    layers = {name: np.array(w) for name, w in base["layers"].items()}
    for module, on in active.items():
        entry = delta["layers"][module]
        for layer, targeted in enumerate(on):
            if targeted:
                flat = layers[module][layer].reshape(-1)  # a view
                np.add.at(flat, np.asarray(entry["indices"][layer]),
                          np.asarray(entry["values"][layer]))
    return dict(base, layers={name: jnp.asarray(w) for name, w in layers.items()})


def _batch():
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 32, size=(4, 9)).astype(np.int32)
    return {"tokens": tokens, "segment_ids": np.ones_like(tokens),
            "positions": np.broadcast_to(np.arange(9, dtype=np.int32), tokens.shape).copy(),
            "loss_mask": np.ones(tokens.shape, bool)}


@jax.jit
def _dense_grad(params, batch):
    """dL/dW of the training loss for every weight of a plain (adapter-free) model."""
    return jax.grad(lambda p: mean_loss(MODEL, p, (), batch)[0])(params)


def _close(a, b, atol=1e-5):
    chex.assert_trees_all_close(a, b, atol=atol, rtol=0)


def test_init_draws_distinct_positions_and_changes_nothing(base):
    for config, active in ((ALL, ALL_LAYERS), (SOME, SOME_LAYERS)):
        delta = spiel.SPIEL.init(KEY, base, MODEL, config)
        assert sorted(delta["layers"]) == sorted(active)
        for module, entry in delta["layers"].items():
            assert entry["values"].shape == (2, 6) and entry["indices"].dtype == jnp.int32
            assert entry["candidates"].shape == (2, math.ceil(0.2 * 6) * 5)
            for layer in range(2):
                both = np.concatenate([entry["indices"][layer], entry["candidates"][layer]])
                assert len(set(both.tolist())) == both.size  # no repeats, no collisions
                assert 0 <= both.min() and both.max() < SIZES[module]
        expected = _logits(MODEL, base, TOKENS)
        _close(_logits(MODEL, base, TOKENS, adapters=[Adapter(delta, "spiel", config)]),
               expected)
        identity = spiel.SPIEL.identity(_randomised(delta), base, MODEL, config)
        assert jax.tree.structure(identity) == jax.tree.structure(delta)
        _close(_logits(MODEL, base, TOKENS, adapters=[Adapter(identity, "spiel", config)]),
               expected)


@pytest.mark.parametrize("config, active", [(ALL, ALL_LAYERS), (SOME, SOME_LAYERS)],
                         ids=["all", "some"])
def test_forward_equals_dense_weight_plus_sparse_delta(base, config, active):
    delta = _randomised(spiel.SPIEL.init(KEY, base, MODEL, config))
    got = _logits(MODEL, base, TOKENS, adapters=[Adapter(delta, "spiel", config)])
    expected = _logits(MODEL, _dense(base, delta, active), TOKENS)
    assert np.abs(np.asarray(expected - _logits(MODEL, base, TOKENS))).max() > 1e-3
    _close(got, expected)


def test_gradients_are_the_dense_gradient_at_the_indices_and_candidates(base):
    config, active = SOME, SOME_LAYERS
    adapter = Adapter(_randomised(spiel.SPIEL.init(KEY, base, MODEL, config)), "spiel", config)
    batch = _batch()
    (trainable,), (frozen,) = partition([adapter])
    grads = jax.jit(jax.grad(lambda t: mean_loss(
        MODEL, base, combine([t], [frozen]), batch)[0]))(trainable).delta
    dense_grads = _dense_grad(_dense(base, adapter.delta, active), batch)
    assert sorted(grads["layers"]) == sorted(active)
    for module, on in active.items():
        entry, g = adapter.delta["layers"][module], grads["layers"][module]
        assert g["indices"] is None and g["candidates"] is None  # frozen: not differentiated
        for layer in range(2):
            dw = np.asarray(dense_grads["layers"][module][layer]).reshape(-1)
            for name, where in (("values", "indices"), ("candidate_grads", "candidates")):
                expected = dw[np.asarray(entry[where][layer])] if on[layer] else 0.0
                got = np.asarray(g[name][layer])
                _close(got, np.broadcast_to(expected, got.shape), atol=1e-6)
                if on[layer]:
                    assert np.abs(got).max() > 1e-4, (module, name)


# ------------------------------------------------------------------------- regrowth


def _adam_moments(opt_state):
    return (optax.tree_utils.tree_get(opt_state, "mu")[0].delta,
            optax.tree_utils.tree_get(opt_state, "nu")[0].delta)


def _numpy_tree(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def _invalid(candidates, indices):
    """Reference validity: an active position, or a repeat of an earlier candidate."""
    seen, bad = set(indices.tolist()), []
    for c in candidates.tolist():
        bad.append(c in seen)
        seen.add(c)
    return np.array(bad)


def test_regrowth_swaps_smallest_values_for_largest_candidate_gradients(base, monkeypatch):
    config = spiel.SpielConfig(targets=Targets(SOME_MODULES, (1,)), count=10,
                               reselection_steps=2, initial_reselection_rate=0.5,
                               candidates_per_replacement_slot=2)
    assert spiel.SPIEL.refresh_every(config) == 2
    delta = spiel.SPIEL.init(KEY, base, MODEL, config)
    # An active position and a repeat among layer 1's q_proj candidates: never grown.
    q = delta["layers"]["q_proj"]
    candidates = np.array(q["candidates"])
    candidates[1, 0] = q["indices"][1, 3]
    candidates[1, 5] = candidates[1, 4]
    delta["layers"]["q_proj"] = dict(q, candidates=jnp.asarray(candidates))
    adapter = Adapter(delta, "spiel", config)
    optimizer = masked_optimizer(optax.adam(1e-2), [adapter])
    # Steps and regrowths raise if they are traced twice: nothing may recompile. (The
    # regrowth is jitted afresh around its chex-wrapped body, as spiel.py jits it.)
    steps = one_device_steps(MODEL, optimizer, base, [adapter], objective=SftTracedOnce())
    monkeypatch.setattr(spiel, "_regrow", jax.jit(
        chex.assert_max_traces(spiel._regrow.__wrapped__, n=1), static_argnums=(0, 1)))
    state = steps.initial_state
    batch = _batch()

    # One step: candidate_grads holds the dense gradient at the candidates (values are 0).
    dense_grad = _dense_grad(base, batch)
    state, _ = steps.train(state, base, batch)
    for module, entry in state.adapters[0].delta["layers"].items():
        dw = np.asarray(dense_grad["layers"][module][1]).reshape(-1)
        _close(entry["candidate_grads"][1], dw[np.asarray(entry["candidates"][1])], atol=1e-6)
        assert not np.asarray(entry["candidate_grads"][0]).any()  # untargeted layer
        assert not np.asarray(entry["values"][0]).any()
    state, _ = steps.train(state, base, batch)
    assert refresh_state(MODEL, optimizer, state, 1, 10) is state  # not a refresh step

    # The invalid candidates get the largest sums, so a wrong validity check would grow them.
    delta = state.adapters[0].delta
    grads = np.array(delta["layers"]["q_proj"]["candidate_grads"])
    grads[1, 0], grads[1, 4], grads[1, 5] = 100.0, 0.0, -100.0  # the repeat's first: valid, 0
    delta["layers"]["q_proj"] = dict(delta["layers"]["q_proj"], candidate_grads=jnp.asarray(grads))
    # Back in the step's layout, as production puts every state changed outside the step.
    state = steps.replace(dataclasses.replace(state, adapters=[Adapter(delta, "spiel", config)]))

    before = _numpy_tree(state.adapters[0].delta["layers"])
    mu, nu = _numpy_tree(_adam_moments(state.opt_state))
    state = steps.replace(refresh_state(MODEL, optimizer, state, 2, 10))
    after = _numpy_tree(state.adapters[0].delta["layers"])
    new_mu, new_nu = _numpy_tree(_adam_moments(state.opt_state))

    swaps = round(0.5 * (1 - 2 / 10) * 10)  # linear decay: 4 of 10
    for module in SOME_MODULES:
        old, new = before[module], after[module]
        for name in old:
            assert new[name].shape == old[name].shape and new[name].dtype == old[name].dtype
        # Layer 0 is not targeted: nothing swaps there.
        np.testing.assert_array_equal(new["indices"][0], old["indices"][0])
        np.testing.assert_array_equal(new["values"][0], old["values"][0])
        values, indices = old["values"][1], old["indices"][1]
        valid = ~_invalid(old["candidates"][1], indices)
        count = min(swaps, int(valid.sum()))
        magnitudes = np.sort(np.abs(values))
        assert magnitudes[count - 1] < magnitudes[count]  # no tie at the cut
        dropped = set(np.argsort(np.abs(values))[:count].tolist())
        scores = np.where(valid, np.abs(old["candidate_grads"][1]), -1.0)
        grown = set(old["candidates"][1][np.argsort(-scores)[:count]].tolist())
        if module == "q_proj":  # the planted active position and repeat (the first is valid)
            assert not valid[0] and valid[4] and not valid[5]
        kept = sorted(set(range(10)) - dropped)
        np.testing.assert_array_equal(new["indices"][1][kept], indices[kept])
        np.testing.assert_array_equal(new["values"][1][kept], values[kept])
        assert set(new["indices"][1][sorted(dropped)].tolist()) == grown
        assert not new["values"][1][sorted(dropped)].any()
        assert len(set(new["indices"][1].tolist())) == 10
        # Adam restarts exactly the swapped slots.
        swapped = np.zeros((2, 10), bool)
        swapped[1, sorted(dropped)] = True
        for old_m, new_m in ((mu, new_mu), (nu, new_nu)):
            moment = old_m["layers"][module]["values"]
            new_moment = new_m["layers"][module]["values"]
            assert np.abs(moment[swapped]).min() > 0
            assert not new_moment[swapped].any()
            np.testing.assert_array_equal(new_moment[~swapped], moment[~swapped])
        # Fresh candidates with zero sums, clear of the active positions and of each other.
        assert not new["candidate_grads"].any()
        assert not np.array_equal(new["candidates"][1], old["candidates"][1])
        assert not _invalid(new["candidates"][1], new["indices"][1]).any()
        assert 0 <= new["candidates"].min() and new["candidates"].max() < SIZES[module]

    # More steps and a second regrowth compile nothing new (a second trace would raise).
    for step in (3, 4):
        state, metrics = steps.train(state, base, batch)
        assert bool(metrics["finite"])
        state = steps.replace(refresh_state(MODEL, optimizer, state, step, 10))
    state, _ = steps.train(state, base, batch)
    monkeypatch.undo()  # spiel's own _regrow again (KEY below sits outside the mesh)
    # Past selection_duration nothing swaps.
    late = spiel.SPIEL.refresh(state.adapters[0].delta, 10, 10, KEY, MODEL, config)
    for module in SOME_MODULES:
        assert not np.asarray(late[1]["layers"][module]["values"]).any()
        np.testing.assert_array_equal(late[0]["layers"][module]["indices"],
                                      state.adapters[0].delta["layers"][module]["indices"])


def test_reselection_rate_policies():
    linear = spiel.SpielConfig(initial_reselection_rate=0.4, selection_duration=0.5)
    cosine = dataclasses.replace(linear, reselection_rate_policy="cosine")
    for step, expected in ((0, 0.4), (25, 0.2), (40, 0.08), (50, 0.0), (90, 0.0)):
        assert spiel.reselection_rate(linear, step, 100) == pytest.approx(expected)
    for step, expected in ((0, 0.4), (25, 0.2), (50, 0.0), (70, 0.0)):
        assert spiel.reselection_rate(cosine, step, 100) == pytest.approx(expected)
    assert spiel.reselection_rate(cosine, 10, 100) == pytest.approx(
        0.2 * (1 + math.cos(math.pi * 0.2)))
    assert spiel.SPIEL.refresh_every(dataclasses.replace(linear, reselection_steps=7)) == 7
    assert spiel.SPIEL.refresh_every(dataclasses.replace(linear, reselection_steps=0)) == 0
    assert spiel.SPIEL.refresh_every(dataclasses.replace(linear, initial_reselection_rate=0)) == 0


# ------------------------------------------------------------------- entry counts


def _ks(base, config):
    delta = spiel.SPIEL.init(KEY, base, MODEL, config)
    ks = {m: e["values"].shape[1] for m, e in delta["layers"].items()}
    return ks, spiel.SPIEL.num_params(delta, MODEL, config), delta


def test_count_options_give_the_expected_entries(base):
    # count: per targeted matrix, so num_params counts targeted (module, layer) pairs.
    ks, n, _ = _ks(base, SOME)
    assert ks == dict.fromkeys(SOME_MODULES, 6) and n == 6 * 3
    ks, n, _ = _ks(base, ALL)
    assert ks == dict.fromkeys(SIZES, 6) and n == 6 * 7 * 2
    # num_tunable_weights: split in proportion to size over the targeted matrices.
    some = spiel.SpielConfig(targets=Targets(SOME_MODULES, (1,)), num_tunable_weights=100)
    targeted = sum(SIZES[m] for m in SOME_MODULES)
    split = {m: 100 * SIZES[m] // targeted for m in SOME_MODULES}
    ks, n, _ = _ks(base, some)
    assert ks == split == {"q_proj": 28, "o_proj": 28, "down_proj": 42} and n == 98
    # density: of all the model's parameters (the reference's int(total_params * density)).
    total = 32 * 16 * 2 + 16 + 2 * (2 * 16 + 3 * 16 * 24 + 2 * 16 * 4 * 4 + 2 * 16 * 2 * 4)
    assert total == MODEL.num_params()
    wanted = int(total * 0.05)
    expected = {m: wanted * SIZES[m] // (2 * sum(SIZES.values())) for m in SIZES}
    ks, n, _ = _ks(base, spiel.SpielConfig(density=0.05))
    assert ks == expected and n == 2 * sum(expected.values()) <= wanted
    # count overrides num_tunable_weights, which overrides density.
    assert _ks(base, spiel.SpielConfig(count=5, num_tunable_weights=100, density=0.5))[0] == (
        dict.fromkeys(SIZES, 5))
    assert _ks(base, dataclasses.replace(some, density=0.5))[0] == split
    # Candidates: ceil(rate * k) * per-slot, capped by the free positions of the matrix.
    _, _, delta = _ks(base, spiel.SpielConfig(targets=("k_proj",), count=120))
    assert delta["layers"]["k_proj"]["candidates"].shape == (2, 128 - 120)
    _, _, delta = _ks(base, spiel.SpielConfig(targets=("k_proj",), count=10,
                                              candidates_per_replacement_slot=3))
    assert delta["layers"]["k_proj"]["candidates"].shape == (2, 2 * 3)


def test_make_config_takes_plain_options():
    config = make_config("spiel", {"targets": ["q_proj", "down_proj"], "layers_to_transform": [1],
                                   "count": 4, "reselection_rate_policy": "cosine"})
    assert config.targets == Targets(("q_proj", "down_proj"), (1,))
    assert (config.count, config.reselection_rate_policy) == (4, "cosine")
    hash(config)


@pytest.mark.parametrize("options, option", [
    (dict(density=0.0), "density"),
    (dict(density=1.5), "density"),
    (dict(count=0), "count"),
    (dict(num_tunable_weights=-3), "num_tunable_weights"),
    (dict(reselection_steps=-1), "reselection_steps"),
    (dict(initial_reselection_rate=1.5), "initial_reselection_rate"),
    (dict(reselection_rate_policy="step"), "reselection_rate_policy"),
    (dict(selection_duration=0.0), "selection_duration"),
    (dict(candidates_per_replacement_slot=0), "candidates_per_replacement_slot"),
])
def test_bad_options_name_the_option(options, option):
    with pytest.raises(JftError, match=rf"spiel {option}\b") as info:
        spiel.SpielConfig(**options)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("options, option", [
    (dict(count=257), "count"),  # q_proj has 256 entries per layer
    (dict(num_tunable_weights=10**6), "num_tunable_weights"),
    (dict(density=1e-4), "density"),  # int(4944 * 1e-4) = 0 weights
    (dict(targets=("nope_proj",)), "nope_proj"),
])
def test_counts_that_do_not_fit_the_model_are_refused(base, options, option):
    with pytest.raises(JftError, match=option):
        spiel.SPIEL.init(KEY, base, MODEL, spiel.SpielConfig(**options))


# ---------------------------------------------------------------------- merging


@pytest.mark.parametrize("config, active", [(ALL, ALL_LAYERS), (SOME, SOME_LAYERS)],
                         ids=["all", "some"])
def test_merge_is_exact_and_unmerge_restores_the_base(base, config, active):
    delta = _randomised(spiel.SPIEL.init(KEY, base, MODEL, config))
    merged = spiel.SPIEL.merge(base, delta, MODEL, config)
    jax.tree.map(lambda a, b: _close(a, b, atol=1e-6), merged, _dense(base, delta, active))
    _close(_logits(MODEL, merged, TOKENS),
           _logits(MODEL, base, TOKENS, adapters=[Adapter(delta, "spiel", config)]))
    restored = spiel.SPIEL.unmerge(merged, delta, MODEL, config)
    assert jax.tree.structure(restored) == jax.tree.structure(base)
    jax.tree.map(lambda a, b: _close(a, b, atol=1e-6), restored, base)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    merged = spiel.SPIEL.merge(bf16, delta, MODEL, config)
    assert {x.dtype for x in jax.tree.leaves(merged)} == {jnp.dtype(jnp.bfloat16)}
