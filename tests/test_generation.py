"""KV-cache decoding, batched generation and sampling."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from jft.formats.loading import load_checkpoint
from jft.inference.generation import Sampling, generate_tokens, sample
from jft.models import forward, init_cache
from tests.hf_reference import VOCAB, save_hf_model


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma2", "gemma3"])
def model(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = save_hf_model(request.param, directory, seed=3)
    checkpoint = load_checkpoint(directory, dtype="float32")
    return hf_model, checkpoint.config.replace(dtype="float32"), checkpoint.params


def test_cached_decoding_equals_full_forward(model):
    _, config, params = model
    tokens = np.random.default_rng(0).integers(3, VOCAB, size=(2, 14))
    run = jax.jit(forward, static_argnums=0)
    full = np.asarray(run(config, params, tokens))
    cache = init_cache(config, batch=2, length=20, dtype="float32")
    logits, cache = run(config, params, tokens[:, :5], cache=cache)
    steps = [np.asarray(logits)]
    for t in range(5, 14):  # past the sliding window of 5
        logits, cache = run(config, params, tokens[:, t:t + 1], cache=cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-4, rtol=0)


def test_batch_of_different_lengths_matches_transformers_greedy(model):
    hf_model, config, params = model
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, VOCAB, size=n).tolist() for n in (3, 9, 6)]
    ours = generate_tokens(config, params, prompts, max_new_tokens=10)
    for prompt, generated in zip(prompts, ours, strict=True):
        with torch.no_grad():
            reference = hf_model.generate(
                torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                eos_token_id=None, pad_token_id=0,
            )[0, len(prompt):].tolist()
        assert generated == reference


def test_stop_token_ends_that_row_only(model):
    _, config, params = model
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    free = generate_tokens(config, params, prompts, max_new_tokens=8)
    stop = free[0][3]
    stopped = generate_tokens(config, params, prompts, max_new_tokens=8, stop_ids=[stop])
    assert stopped[0] == free[0][: free[0].index(stop)]
    expected_second = free[1][: free[1].index(stop)] if stop in free[1] else free[1]
    assert stopped[1] == expected_second


@pytest.mark.parametrize("model", ["llama"], indirect=True)  # sampling is family-blind
def test_top_k_one_and_tiny_top_p_are_greedy(model):
    _, config, params = model
    prompts = [[4, 8, 15, 16, 23, 42]]
    greedy = generate_tokens(config, params, prompts, max_new_tokens=6)
    top_k = generate_tokens(config, params, prompts, 6, sampling=Sampling(1.0, top_k=1), seed=7)
    top_p = generate_tokens(config, params, prompts, 6, sampling=Sampling(1.0, top_p=1e-6))
    assert top_k == greedy and top_p == greedy


def _frequencies(logits, sampling, draws=20000):
    keys = jax.random.split(jax.random.key(0), draws)
    tokens = jax.vmap(lambda k: sample(logits[None], k, sampling)[0])(keys)
    return np.bincount(np.asarray(tokens), minlength=logits.shape[-1]) / draws


def test_sampling_follows_tempered_top_k_top_p_distribution():
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.1], np.float32))
    np.testing.assert_allclose(_frequencies(logits, Sampling(1.0)), [0.5, 0.25, 0.15, 0.1],
                               atol=0.015)
    tempered = np.exp(logits / 0.5) / np.exp(logits / 0.5).sum()
    np.testing.assert_allclose(_frequencies(logits, Sampling(0.5)), tempered, atol=0.015)
    np.testing.assert_allclose(_frequencies(logits, Sampling(1.0, top_k=2)),
                               [2 / 3, 1 / 3, 0, 0], atol=0.015)
    # top_p=0.7: 0.5 alone is short of 0.7, 0.5 + 0.25 reaches it.
    np.testing.assert_allclose(_frequencies(logits, Sampling(1.0, top_p=0.7)),
                               [2 / 3, 1 / 3, 0, 0], atol=0.015)
