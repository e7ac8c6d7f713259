"""Each family's logits equal transformers' on a tiny random checkpoint (fp32, 1e-4)."""

from __future__ import annotations

import numpy as np
import pytest

from jft.formats.loading import load_checkpoint
from jft.models import MoeConfig, forward
from tests.hf_reference import MOE_CONFIGS, TINY_CONFIGS, VOCAB, hf_logits, save_hf_model

FAMILIES = list(TINY_CONFIGS) + list(MOE_CONFIGS)


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = save_hf_model(request.param, directory)
    checkpoint = load_checkpoint(directory, dtype="float32")
    config = checkpoint.config.replace(dtype="float32")
    return request.param, hf_model, config, checkpoint.params


def _tokens(batch, length, seed=0):
    return np.random.default_rng(seed).integers(3, VOCAB, size=(batch, length))


def test_logits_match_transformers(pair):
    family, hf_model, config, params = pair
    tokens = _tokens(2, 13)  # longer than the sliding windows of 5
    ours = np.asarray(forward(config, params, tokens))
    np.testing.assert_allclose(ours, hf_logits(hf_model, tokens), atol=1e-4, rtol=0)
    # Plain Python lists of token ids are accepted too.
    np.testing.assert_array_equal(np.asarray(forward(config, params, tokens.tolist())), ours)


def test_packed_segments_equal_separate_sequences(pair):
    family, hf_model, config, params = pair
    first, second = _tokens(1, 7, seed=1), _tokens(1, 6, seed=2)
    packed = np.concatenate([first, second], axis=1)
    segments = np.array([[1] * 7 + [2] * 6])
    logits = np.asarray(forward(config, params, packed, segment_ids=segments))
    np.testing.assert_allclose(logits[:, :7], hf_logits(hf_model, first), atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits[:, 7:], hf_logits(hf_model, second), atol=1e-4, rtol=0)


def test_config_reflects_family_features(pair):
    family, _, config, _ = pair
    expected = {
        "llama": dict(qkv_bias=False, qk_norm=False, layer_types=("full",) * 3),
        "llama3": dict(qkv_bias=True, mlp_bias=True),
        "mistral": dict(sliding_window=5, layer_types=("sliding",) * 3),
        "qwen2": dict(qkv_bias=True, o_bias=False, tie_embeddings=True),
        "qwen3": dict(qk_norm=True, head_dim=24),
        "gemma": dict(norm_plus_one=True, embed_scale=True, tie_embeddings=True),
        "gemma2": dict(attn_softcap=3.0, final_softcap=4.0, post_norms=True,
                       layer_types=("sliding", "full", "sliding")),
        "gemma3": dict(qk_norm=True, layer_types=("sliding",) * 5 + ("full", "sliding")),
        "mixtral": dict(moe=MoeConfig(4, 2, 32, norm_topk=True, dense_mlp_dim=32)),
        "qwen2_moe": dict(qkv_bias=True, mlp_dim=48, moe=MoeConfig(
            4, 2, 32, norm_topk=False, shared_expert=True, shared_gate=True, dense_mlp_dim=96)),
        "qwen3_moe": dict(qk_norm=True, moe=MoeConfig(6, 2, 32, norm_topk=True,
                                                      dense_mlp_dim=96)),
        "olmoe": dict(qk_norm_whole=True, clip_qkv=2.0, moe=MoeConfig(
            4, 3, 32, norm_topk=False, aux_loss_coef=0.01, dense_mlp_dim=32)),
    }[family]
    for field, value in expected.items():
        assert getattr(config, field) == value, field
    assert config.rope.kind == {"llama3": "llama3", "gemma3": "linear"}.get(family, "default")


def test_the_public_steps_compose_to_forward(pair):
    import jax

    from jft.models.transformer import (
        LayerHooks,
        decoder_layer,
        embed,
        final_hidden,
        output_logits,
        packed_layer_inputs,
    )

    _, _, config, params = pair
    tokens = _tokens(2, 9)
    segments = np.array([[1] * 5 + [2] * 4, [1] * 7 + [0] * 2])
    x = embed(config, params, tokens)
    inputs = packed_layer_inputs(config, segments)
    for i in range(config.num_layers):
        layer = jax.tree.map(lambda w, i=i: w[i], params["layers"])
        x, _ = decoder_layer(config, layer, x, config.layer_types[i] == "sliding", inputs,
                             LayerHooks(config, i, ()))
    logits = output_logits(config, *final_hidden(config, params, x))
    expected = forward(config, params, tokens, segment_ids=segments)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-5, rtol=0)
