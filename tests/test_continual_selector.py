"""ConPET's task selector: prompt features from the frozen base, the softmax classifier
over them (checked against scikit-learn), and its safetensors file."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file
from sklearn.linear_model import LogisticRegression

from jft.continual.selector import Selector, fit_selector, prompt_features
from jft.errors import JftError
from jft.models import ModelConfig, RopeConfig, RuntimePolicy, forward, init_params

MODEL = ModelConfig(
    family="llama", vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=8, mlp_dim=48, norm_eps=1e-6, rope=RopeConfig(), layer_types=("full", "full"),
    policy=RuntimePolicy(dtype="float32"),
)
NUM_TASKS, DIM, L2 = 4, 16, 1e-3


def _blobs(rng, centers, n):
    """n points [n, D] around `centers` [K, D] (unit Gaussian noise) and their class ids."""
    labels = rng.integers(0, len(centers), n)
    return (centers[labels] + rng.normal(size=(n, centers.shape[1]))).astype(np.float32), labels


def _objective(x, labels, weights, bias, l2):
    """fit_selector's objective in NumPy: mean softmax cross-entropy + l2/2 * ||W||^2."""
    logits = x @ weights + bias
    logits = logits - logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(labels)), labels].mean() + 0.5 * l2 * np.sum(weights**2)


@pytest.fixture(scope="module")
def blobs():
    """(train features, train labels, held-out features, held-out labels): 4 overlapping
    Gaussian blobs in 16 dimensions, so that the classes share a boundary to agree on."""
    rng = np.random.default_rng(0)
    centers = 0.5 * rng.normal(size=(NUM_TASKS, DIM)) + 3.0  # an offset to standardise away
    return (*_blobs(rng, centers, 400), *_blobs(rng, centers, 2000))


def test_fit_selector_matches_sklearn_multinomial_logistic_regression(blobs):
    x, y, x_test, y_test = blobs
    selector = fit_selector(x, y, NUM_TASKS, l2=L2)
    standardised = ((x - selector.mean) / selector.scale).astype(np.float64)
    np.testing.assert_allclose(standardised.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(standardised.std(axis=0), 1, atol=1e-5)
    # sklearn minimises C * (summed cross-entropy) + 1/2 ||W||^2: C = 1/(l2 N) is the same
    # objective up to the factor C N. Multinomial is its default for lbfgs and K > 2.
    reference = LogisticRegression(C=1 / (L2 * len(x)), tol=1e-10, max_iter=10_000)
    reference.fit(standardised, y)

    ours = _objective(standardised, y, selector.weights.astype(np.float64),
                      selector.bias.astype(np.float64), L2)
    optimum = _objective(standardised, y, reference.coef_.T, reference.intercept_, L2)
    assert optimum - 1e-6 <= ours <= optimum + 1e-3, (ours, optimum)
    predictions = selector.predict(x_test)
    expected = reference.predict((x_test - selector.mean) / selector.scale)
    assert predictions.dtype.kind == "i" and predictions.shape == (len(x_test),)
    assert np.mean(predictions == expected) >= 0.97
    assert selector.accuracy(x_test, y_test) == pytest.approx(np.mean(expected == y_test),
                                                              abs=0.03)
    assert selector.accuracy(x_test, y_test) > 0.6  # well above chance (0.25)


def test_fit_selector_gives_absent_tasks_a_column_and_refuses_bad_labels(blobs):
    x, y, _, _ = blobs
    present = y < 3
    selector = fit_selector(x[present], y[present], num_tasks=5, steps=100)
    assert selector.weights.shape == (DIM, 5) and selector.bias.shape == (5,)
    assert set(selector.predict(x).tolist()) <= {0, 1, 2}
    with pytest.raises(JftError, match=r"0\.\.3"):
        fit_selector(x, np.where(y == 0, 4, y), NUM_TASKS)
    with pytest.raises(JftError, match=r"0\.\.3"):
        fit_selector(x, np.where(y == 0, -1, y), NUM_TASKS)


def test_fit_selector_keeps_a_constant_feature_at_scale_one(blobs):
    x, y, _, _ = blobs
    x = x.copy()
    x[:, 0] = 0.1
    selector = fit_selector(x, y, NUM_TASKS, steps=50)
    assert selector.scale[0] == 1.0 and np.all(np.isfinite(selector.logits(x)))


def test_selector_save_and_load_round_trip(blobs, tmp_path):
    x, y, _, _ = blobs
    selector = fit_selector(x, y, NUM_TASKS, steps=50)
    path = tmp_path / "selector.safetensors"
    selector.save(path)
    loaded = Selector.load(path)
    for name in ("mean", "scale", "weights", "bias"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(selector, name))
        assert getattr(loaded, name).dtype == np.float32
    assert loaded.num_tasks == NUM_TASKS
    np.testing.assert_array_equal(loaded.predict(x), selector.predict(x))


def test_selector_load_of_a_missing_or_garbage_file_names_the_file(blobs, tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(JftError, match="missing.safetensors"):
        Selector.load(missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(JftError, match="garbage.safetensors"):
        Selector.load(garbage)
    # A valid safetensors file that is not a selector (no format metadata).
    other = tmp_path / "other.safetensors"
    save_file({"weights": np.zeros((3, 2), np.float32)}, other)
    with pytest.raises(JftError, match="other.safetensors"):
        Selector.load(other)


@pytest.fixture(scope="module")
def params():
    return init_params(MODEL, jax.random.key(0), std=0.2)


def test_prompt_features_equal_the_unpadded_mean_hidden_state_of_each_prompt(params):
    rng = np.random.default_rng(1)
    # Batches of 2 (sorted by length): [1, 7] in one 32-token bucket, [12, 33] padded to 64,
    # and [40] beside a row that only pads the batch.
    prompts = [rng.integers(0, MODEL.vocab_size, n).tolist() for n in (12, 1, 40, 33, 7)]
    features = prompt_features(MODEL, params, prompts, batch_size=2)
    assert features.shape == (len(prompts), MODEL.embed_dim) and features.dtype == np.float32
    hidden_states = jax.jit(lambda p, tokens: forward(MODEL, p, tokens, return_hidden=True)[0])
    for prompt, got in zip(prompts, features, strict=True):
        hidden = hidden_states(params, np.asarray([prompt]))  # [1, T, D], no padding
        np.testing.assert_allclose(got, np.asarray(hidden[0]).mean(axis=0), atol=1e-5)


def test_prompt_features_refuse_empty_prompts_and_out_of_vocabulary_ids(params):
    with pytest.raises(JftError, match="prompt 1 is empty"):
        prompt_features(MODEL, params, [[1, 2], []])
    with pytest.raises(JftError, match="prompt 0 has token ids outside 0..63"):
        prompt_features(MODEL, params, [[1, 64]])
