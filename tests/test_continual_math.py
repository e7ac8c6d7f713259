"""The continual strategies' formulas against direct NumPy transcriptions of the papers:
O-LoRA's penalty and its gradient, GeRe's thresholds and margin loss, OSF's projection
(and that trained updates really stay out of the preserved subspace), ROUGE-L, and the
replay buffers and mixed batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jft.continual.mixing import MixedBatcher, per_task, replay_rows, reservoir
from jft.continual.scoring import rouge_l
from jft.continual.strategies.gere import margin_loss
from jft.continual.strategies.olora import l2_norms, orthogonality
from jft.models import ModelConfig, RopeConfig, forward, init_params
from jft.models.config import RuntimePolicy
from jft.peft import Adapter, create
from jft.peft.base import combine, partition
from jft.peft.osf import effective_update
from jft.training.data import Batcher, TokenizedExample, TokenizedExamples

MODEL = ModelConfig(
    family="llama", vocab_size=40, embed_dim=16, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=4, mlp_dim=24, norm_eps=1e-6, rope=RopeConfig(), layer_types=("full", "full"),
    policy=RuntimePolicy(dtype="float32"),
)


# ------------------------------------------------------------------ O-LoRA


def _lora_delta(key, layers=2, d_in=6, rank=3, d_out=5, modules=("q_proj", "v_proj")):
    out = {}
    for module in modules:
        key, ka, kb = jax.random.split(key, 3)
        out[module] = {"a": jax.random.normal(ka, (layers, d_in, rank)),
                       "b": jax.random.normal(kb, (layers, rank, d_out))}
    return {"layers": out}


def test_olora_orthogonality_is_the_l1_norm_of_a_prev_a_t_transposed():
    new = _lora_delta(jax.random.key(0))
    old = [_lora_delta(jax.random.key(1)), _lora_delta(jax.random.key(2), modules=("q_proj",))]
    expected = 0.0
    for module, entry in new["layers"].items():
        # The paper's layout: A [r, d_in]; A_prev stacks the earlier tasks' rows.
        a_t = np.swapaxes(np.asarray(entry["a"]), 1, 2)
        previous = [np.swapaxes(np.asarray(d["layers"][module]["a"]), 1, 2)
                    for d in old if module in d["layers"]]
        a_prev = np.concatenate(previous, axis=1)  # [L, r_sum, d_in]
        for layer in range(a_t.shape[0]):
            expected += np.abs(a_prev[layer] @ a_t[layer].T).sum()
    np.testing.assert_allclose(orthogonality(new, [d for d in old]), expected, rtol=1e-5)


def test_olora_penalty_gradient_matches_numpy():
    new = _lora_delta(jax.random.key(3), modules=("q_proj",))
    old = [_lora_delta(jax.random.key(4), modules=("q_proj",))]
    grad = jax.grad(lambda d: orthogonality(d, old))(new)["layers"]["q_proj"]["a"]
    # d/dA_t Σ|A_prev A_tᵀ| = sign(A_prev A_tᵀ)ᵀ A_prev, in jft's transposed layout.
    a_t = np.swapaxes(np.asarray(new["layers"]["q_proj"]["a"]), 1, 2)
    a_prev = np.swapaxes(np.asarray(old[0]["layers"]["q_proj"]["a"]), 1, 2)
    for layer in range(a_t.shape[0]):
        sign = np.sign(a_prev[layer] @ a_t[layer].T)  # [r_prev, r]
        expected = (sign.T @ a_prev[layer]).T  # [d_in, r]
        np.testing.assert_allclose(grad[layer], expected, rtol=1e-5)
    assert float(orthogonality(new, [])) == 0.0


def test_olora_l2_term_sums_per_layer_frobenius_norms_and_is_safe_at_zero():
    delta = _lora_delta(jax.random.key(5))
    expected = sum(np.linalg.norm(np.asarray(x)[layer])
                   for entry in delta["layers"].values() for x in entry.values()
                   for layer in range(2))
    np.testing.assert_allclose(l2_norms(delta), expected, rtol=1e-5)
    zero = jax.tree.map(jnp.zeros_like, delta)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(jax.grad(l2_norms)(zero)))


# ------------------------------------------------------------------ GeRe


def _numpy_margin(h, h0, low, high, valid):
    total, count = 0.0, 0
    for idx in np.ndindex(*h.shape[:-1]):
        if not valid[idx]:
            continue
        for d in range(h.shape[-1]):
            x, x0 = h[idx][d], h0[idx][d]
            if x0 <= low[d]:
                value = max(x - low[d], 0.0)
            elif x0 >= high[d]:
                value = max(high[d] - x, 0.0)
            else:
                value = max(x - high[d], 0.0) + max(low[d] - x, 0.0)
            total += value
            count += value != 0
    return total / (count + 1e-8)


def test_gere_margin_loss_matches_the_papers_rule():
    rng = np.random.default_rng(0)
    h0 = rng.normal(size=(2, 5, 8)).astype(np.float32)
    flat = h0.reshape(-1, 8)
    low, high = flat.mean(0) - flat.std(0), flat.mean(0) + flat.std(0)
    h = h0 + rng.normal(scale=0.7, size=h0.shape).astype(np.float32)
    valid = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    np.testing.assert_allclose(margin_loss(h, h0, low, high, valid),
                               _numpy_margin(h, h0, low, high, valid), rtol=1e-5)
    # Before any update the hidden states are the initial ones: the loss is exactly 0.
    assert float(margin_loss(h0, h0, low, high, valid)) == 0.0


# ------------------------------------------------------------------ OSF


def test_osf_bases_are_the_top_singular_vectors_and_the_update_is_projected():
    params = init_params(MODEL, jax.random.key(0))
    _, adapter = create("osf", jax.random.key(1), params, MODEL, preserved_rank=0.5)
    entry = adapter.delta["layers"]["down_proj"]
    weight = np.asarray(params["layers"]["down_proj"][1], np.float64)  # [mlp, embed]
    u, _, vt = np.linalg.svd(weight, full_matrices=False)
    k = int(0.5 * min(weight.shape))
    p, q = np.asarray(entry["p"][1]), np.asarray(entry["q"][1])
    assert p.shape == (24, k) and q.shape == (16, k)
    # The same subspaces (vectors up to sign): equal projectors.
    np.testing.assert_allclose(p @ p.T, u[:, :k] @ u[:, :k].T, atol=1e-5)
    np.testing.assert_allclose(q @ q.T, vt[:k].T @ vt[:k], atol=1e-5)
    w = np.random.default_rng(0).normal(size=weight.shape)
    expected = (np.eye(24) - p @ p.T) @ w @ (np.eye(16) - q @ q.T)
    layered = dict(entry, w=jnp.asarray(np.stack([w, w]), jnp.float32))
    np.testing.assert_allclose(effective_update(layered)[1], expected, atol=1e-5)


def test_osf_training_never_moves_the_preserved_subspace():
    """Adam with weight decay, several steps: the trained weight's change has no
    component along the frozen singular directions, on either side."""
    params = init_params(MODEL, jax.random.key(0))
    base, adapter = create("osf", jax.random.key(1), params, MODEL, preserved_rank=0.5)
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, MODEL.vocab_size)
    optimizer = optax.adamw(1e-2, weight_decay=0.1)
    trainable, frozen = partition([adapter])
    state = optimizer.init(trainable)

    def loss(part):
        logits = forward(MODEL, base, tokens, adapters=combine(part, frozen))
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1],
                                                               tokens[:, 1:]).mean()

    @jax.jit
    def step(trainable, state):
        updates, state = optimizer.update(jax.grad(loss)(trainable), state, trainable)
        return optax.apply_updates(trainable, updates), state

    for _ in range(4):
        trainable, state = step(trainable, state)
    trained = combine(trainable, frozen)[0]
    merged = trained.impl.merge(base, trained.delta, MODEL, trained.config)
    for module, entry in trained.delta["layers"].items():
        change = np.asarray(merged["layers"][module] - base["layers"][module], np.float64)
        change = change.reshape(MODEL.num_layers, entry["p"].shape[1], entry["q"].shape[1])
        assert np.abs(change).max() > 1e-4, module  # it did train
        for layer in range(MODEL.num_layers):
            p, q = np.asarray(entry["p"][layer]), np.asarray(entry["q"][layer])
            assert np.abs(p.T @ change[layer]).max() < 1e-5, module
            assert np.abs(change[layer] @ q).max() < 1e-5, module
    np.testing.assert_allclose(forward(MODEL, merged, tokens),
                               forward(MODEL, base, tokens, adapters=[trained]), atol=1e-4)


def test_frozen_adapters_ride_along_untrained():
    params = init_params(MODEL, jax.random.key(0))
    _, first = create("lora", jax.random.key(1), params, MODEL, r=2, targets=["q_proj"])
    _, second = create("lora", jax.random.key(2), params, MODEL, r=2, targets=["q_proj"])
    stack = [Adapter(first.delta, "lora", first.config, frozen=True), second]
    trainable, _ = partition(stack)
    assert all(leaf is None for leaf in jax.tree.leaves(
        trainable[0].delta, is_leaf=lambda x: x is None))
    assert jax.tree.leaves(trainable[1].delta)


# ------------------------------------------------------------------ scoring and replay


@pytest.mark.parametrize("generated, reference, expected", [
    ("the cat sat on the mat", "the cat was on the mat", 5 / 6),  # LCS 5 of 6 and 6
    ("A b, c d!", "b d", 2 * 0.5 * 1.0 / 1.5),  # LCS 2: P 2/4, R 2/2
    ("", "x", 0.0),
    ("Paris", "paris", 1.0),
])
def test_rouge_l(generated, reference, expected):
    assert rouge_l(generated, reference) == pytest.approx(expected)


def test_reservoir_is_uniform_over_everything_seen_and_per_task_is_equal():
    counts = np.zeros(30)
    for seed in range(3000):
        for task, i in reservoir([10, 20], 6, seed):
            counts[task * 10 + i] += 1
    # Each of the 30 examples is kept with probability 6/30.
    np.testing.assert_allclose(counts / 3000, 0.2, atol=0.03)
    pairs = per_task([10, 3, 8], 4, seed=1)
    assert [sum(t == k for t, _ in pairs) for k in range(3)] == [4, 3, 4]
    assert pairs == per_task([10, 3, 8], 4, seed=1)


def test_mixed_batches_mark_the_replayed_rows_and_resume_exactly():
    def examples(offset):
        return TokenizedExamples.from_examples(
            TokenizedExample(list(range(offset, offset + 3 + i % 4)), [True] * (3 + i % 4))
            for i in range(20))

    def make():
        return MixedBatcher(Batcher(examples(0), 3, 8, seed=1),
                            Batcher(examples(100), replay_rows(4, 0.25), 8, seed=1))

    mixed = make()
    first = next(mixed)
    assert first["tokens"].shape == (4, 8)
    assert first["replay"].tolist() == [False, False, False, True]
    assert (first["tokens"][3][first["segment_ids"][3] != 0] >= 100).all()
    saved = mixed.state()
    expected = [next(mixed) for _ in range(3)]
    resumed = make()
    resumed.restore(saved)
    for batch, again in zip(expected, [next(resumed) for _ in range(3)], strict=True):
        for key in batch:
            np.testing.assert_array_equal(batch[key], again[key])
