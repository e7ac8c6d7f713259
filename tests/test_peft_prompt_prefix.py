"""Prompt tuning and prefix tuning against PEFT on a tiny Llama, plus inits, counts, grads."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jft.errors import JftError
from jft.formats.loading import load_checkpoint
from jft.models import forward
from jft.models.transformer import init_cache
from jft.peft.base import Adapter
from jft.peft.prefix_tuning import (
    PREFIX_TUNING,
    PrefixTuningConfig,
    bake,
    baked_config,
)
from jft.peft.prefix_tuning import from_peft as prefix_from_peft
from jft.peft.prefix_tuning import to_peft as prefix_to_peft
from jft.peft.prompt_tuning import (
    PROMPT_TUNING,
    PromptTuningConfig,
    text_token_ids,
    virtual_token_ids,
)
from jft.peft.prompt_tuning import from_peft as prompt_from_peft
from jft.peft.prompt_tuning import to_peft as prompt_to_peft
from tests.hf_reference import VOCAB, hf_logits, save_hf_model

TOKENS = np.random.default_rng(0).integers(3, VOCAB, size=(2, 9)).astype(np.int32)
P = 4




def _peft_model(hf_model, peft_config):
    from peft import get_peft_model

    torch.manual_seed(0)
    return get_peft_model(copy.deepcopy(hf_model), peft_config).eval()


def _peft_logits(peft_model, tokens):
    with torch.no_grad():
        return peft_model(input_ids=torch.tensor(tokens)).logits.float().numpy()


def _state(module) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in module.state_dict().items()}


def _prefix_delta_from_peft(encoder, model, config):
    """PEFT's PrefixEncoder weights in jft's delta layout."""
    s = _state(encoder)
    L, K, H = model.num_layers, model.num_kv_heads, model.head_dim
    if not config.projection:
        return prefix_from_peft({"prompt_embeddings": s["embedding.weight"]}, model, config)
    F = s["transform.0.weight"].shape[0]
    w2 = s["transform.2.weight"].T.reshape(F, L, 2, K, H)
    return {
        "embedding": jnp.asarray(s["embedding.weight"]),
        "w1": jnp.asarray(s["transform.0.weight"].T),
        "b1": jnp.asarray(s["transform.0.bias"]),
        "layers": {"w2": jnp.asarray(np.moveaxis(w2, 1, 0)),
                   "b2": jnp.asarray(s["transform.2.bias"].reshape(L, 2, K, H))},
    }


# ---------------------------------------------------------------- prompt tuning


def test_prompt_tuning_logits_match_peft(llama):
    from peft import PromptTuningConfig as PeftPromptTuningConfig

    hf_model, model, params = llama
    peft_model = _peft_model(hf_model, PeftPromptTuningConfig(task_type="CAUSAL_LM",
                                                              num_virtual_tokens=P))
    theirs = _peft_logits(peft_model, TOKENS)
    assert theirs.shape == (2, P + TOKENS.shape[1], VOCAB)  # PEFT keeps the virtual logits
    assert np.abs(theirs[:, P:] - hf_logits(hf_model, TOKENS)).max() > 1e-2  # prompts matter
    config = PromptTuningConfig(num_virtual_tokens=P)
    delta = prompt_from_peft({"prompt_embeddings": peft_model.get_prompt_embedding_to_save(
        "default").numpy()}, model, config)
    ours = np.asarray(forward(model, params, TOKENS,
                              adapters=[Adapter(delta, PROMPT_TUNING.name, config)]))
    assert ours.shape == TOKENS.shape + (VOCAB,)
    np.testing.assert_allclose(ours, theirs[:, P:], atol=1e-4, rtol=0)
    np.testing.assert_allclose(prompt_to_peft(delta)["prompt_embeddings"],
                               peft_model.get_prompt_embedding_to_save("default").numpy())


def test_prompt_tuning_param_count_matches_peft(llama):
    from peft import PromptTuningConfig as PeftPromptTuningConfig

    hf_model, model, params = llama
    peft_model = _peft_model(hf_model, PeftPromptTuningConfig(task_type="CAUSAL_LM",
                                                              num_virtual_tokens=P))
    config = PromptTuningConfig(num_virtual_tokens=P)
    delta = PROMPT_TUNING.init(jax.random.key(0), params, model, config)
    assert delta["embedding"].shape == (P, model.embed_dim)
    expected = peft_model.get_nb_trainable_parameters()[0]
    assert PROMPT_TUNING.num_params(delta, model, config) == expected == P * model.embed_dim


def test_prompt_tuning_text_init_repeats_or_truncates_token_embeddings(llama):
    _, model, params = llama
    embed = np.asarray(params["embed"])
    for ids, expected in [((5, 6, 7), [5, 6, 7, 5]), ((9, 8, 7, 6, 5, 4), [9, 8, 7, 6])]:
        config = PromptTuningConfig(num_virtual_tokens=P, init="text", init_token_ids=ids)
        assert virtual_token_ids(ids, P) == expected
        delta = PROMPT_TUNING.init(jax.random.key(0), params, model, config)
        np.testing.assert_array_equal(np.asarray(delta["embedding"]), embed[expected])
    sampled = PROMPT_TUNING.init(jax.random.key(1), params, model,
                                 PromptTuningConfig(num_virtual_tokens=P, init="sample_vocab"))
    rows = np.asarray(sampled["embedding"])
    assert all((embed == row).all(axis=1).any() for row in rows)


def test_prompt_tuning_text_ids_follow_peft_tokenization():
    class FakeHfTokenizer:  # transformers' call interface, as PEFT uses it
        def __call__(self, text):
            return {"input_ids": [1] + [ord(c) for c in text]}

    assert text_token_ids(FakeHfTokenizer(), "ab") == [1, 97, 98]
    config = PromptTuningConfig.from_text(FakeHfTokenizer(), "ab", num_virtual_tokens=5)
    assert config.init_token_ids == (1, 97, 98)
    assert virtual_token_ids(config.init_token_ids, 5) == [1, 97, 98, 1, 97]


def test_prompt_tuning_bad_configs_and_merge_raise(llama):
    _, model, params = llama
    with pytest.raises(JftError, match="init_token_ids"):
        PromptTuningConfig(init="text")
    with pytest.raises(JftError, match="unknown prompt tuning init"):
        PromptTuningConfig(init="vocab")
    with pytest.raises(JftError, match="vocabulary"):
        PROMPT_TUNING.init(jax.random.key(0), params, model,
                           PromptTuningConfig(P, "text", (VOCAB + 3,)))
    config = PromptTuningConfig(num_virtual_tokens=P)
    delta = PROMPT_TUNING.init(jax.random.key(0), params, model, config)
    with pytest.raises(JftError, match="cannot be merged"):
        PROMPT_TUNING.merge(params, delta, model, config)


# ---------------------------------------------------------------- prefix tuning

PREFIX_CASES = {
    "plain": (dict(), PrefixTuningConfig(num_virtual_tokens=P)),
    "projection": (dict(prefix_projection=True, encoder_hidden_size=24),
                   PrefixTuningConfig(num_virtual_tokens=P, projection=True,
                                      encoder_hidden_size=24)),
}


@pytest.fixture(scope="module", params=list(PREFIX_CASES))
def prefix_pair(request, llama):
    from peft import PrefixTuningConfig as PeftPrefixTuningConfig

    hf_model, model, params = llama
    peft_kwargs, config = PREFIX_CASES[request.param]
    peft_model = _peft_model(hf_model, PeftPrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, **peft_kwargs))
    delta = _prefix_delta_from_peft(peft_model.prompt_encoder["default"], model, config)
    return peft_model, config, delta


def test_prefix_tuning_logits_match_peft(llama, prefix_pair):
    hf_model, model, params = llama
    peft_model, config, delta = prefix_pair
    ours = np.asarray(forward(model, params, TOKENS,
                              adapters=[Adapter(delta, PREFIX_TUNING.name, config)]))
    theirs = _peft_logits(peft_model, TOKENS)
    assert theirs.shape == ours.shape == TOKENS.shape + (VOCAB,)
    assert np.abs(theirs - hf_logits(hf_model, TOKENS)).max() > 1e-2  # the prefix matters
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_prefix_tuning_param_count_matches_peft(llama, prefix_pair):
    _, model, params = llama
    peft_model, config, delta = prefix_pair
    expected = peft_model.get_nb_trainable_parameters()[0]
    assert PREFIX_TUNING.num_params(delta, model, config) == expected
    fresh = PREFIX_TUNING.init(jax.random.key(0), params, model, config)
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, delta)
    assert PREFIX_TUNING.num_params(fresh, model, config) == expected


def test_prefix_tuning_default_encoder_size_is_peft_token_dim(llama):
    """PEFT's encoder_hidden_size defaults to its token_dim, kv heads x head dim (not D)."""
    from peft import PrefixTuningConfig as PeftPrefixTuningConfig

    hf_model, model, params = llama
    peft_model = _peft_model(hf_model, PeftPrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True))
    config = PrefixTuningConfig(num_virtual_tokens=P, projection=True)
    delta = PREFIX_TUNING.init(jax.random.key(0), params, model, config)
    ours = jax.tree.map(jnp.shape, delta)
    theirs = jax.tree.map(jnp.shape, _prefix_delta_from_peft(
        peft_model.prompt_encoder["default"], model, config))
    assert ours == theirs and ours["w1"] == (model.num_kv_heads * model.head_dim,) * 2
    assert PREFIX_TUNING.num_params(delta, model, config) == \
        peft_model.get_nb_trainable_parameters()[0]


def test_prefix_tuning_bake_gives_peft_prompt_embeddings_and_same_logits(llama, prefix_pair):
    _, model, params = llama
    peft_model, config, delta = prefix_pair
    baked = bake(delta, config)
    assert jax.tree.map(jnp.shape, baked) == {"layers": {
        "keys": (model.num_layers, P, model.num_kv_heads, model.head_dim),
        "values": (model.num_layers, P, model.num_kv_heads, model.head_dim)}}
    saved = peft_model.get_prompt_embedding_to_save("default").numpy()
    np.testing.assert_allclose(prefix_to_peft(delta)["prompt_embeddings"], saved, atol=1e-6)
    plain = baked_config(config)
    reloaded = prefix_from_peft({"prompt_embeddings": saved}, model, plain)
    full = forward(model, params, TOKENS, adapters=[Adapter(delta, PREFIX_TUNING.name, config)])
    for d in (baked, reloaded):
        logits = forward(model, params, TOKENS, adapters=[Adapter(d, PREFIX_TUNING.name, plain)])
        np.testing.assert_allclose(np.asarray(logits), np.asarray(full), atol=1e-5, rtol=0)


def test_prefix_tuning_cached_decoding_equals_full_forward(llama):
    _, model, params = llama
    config = PrefixTuningConfig(num_virtual_tokens=P, projection=True)
    adapters = [Adapter(PREFIX_TUNING.init(jax.random.key(2), params, model, config),
                        PREFIX_TUNING.name, config)]
    full = forward(model, params, TOKENS, adapters=adapters)
    cache = init_cache(model, TOKENS.shape[0], TOKENS.shape[1], jnp.float32)
    first, cache = forward(model, params, TOKENS[:, :6], cache=cache, adapters=adapters)
    rest, _ = forward(model, params, TOKENS[:, 6:], cache=cache, adapters=adapters)
    np.testing.assert_allclose(np.concatenate([first, rest], axis=1), full, atol=1e-5, rtol=0)


def test_prefix_tuning_zero_init_and_merge(llama):
    _, model, params = llama
    for projection in (False, True):
        config = PrefixTuningConfig(num_virtual_tokens=P, projection=projection, init="zero")
        delta = PREFIX_TUNING.init(jax.random.key(0), params, model, config)
        baked = bake(delta, config)["layers"]
        assert not np.asarray(baked["keys"]).any() and not np.asarray(baked["values"]).any()
        with pytest.raises(JftError, match="cannot be merged"):
            PREFIX_TUNING.merge(params, delta, model, config)
    with pytest.raises(JftError, match="projection"):
        PrefixTuningConfig(encoder_hidden_size=8)


# ---------------------------------------------------------------- gradients


def test_grad_over_adapters_is_only_for_delta_leaves(llama):
    _, model, params = llama
    configs = [PromptTuningConfig(num_virtual_tokens=P), PrefixTuningConfig(num_virtual_tokens=P),
               PrefixTuningConfig(num_virtual_tokens=2, projection=True)]
    methods = [PROMPT_TUNING, PREFIX_TUNING, PREFIX_TUNING]
    adapters = [Adapter(m.init(jax.random.key(i), params, model, c), m.name, c)
                for i, (m, c) in enumerate(zip(methods, configs, strict=True))]
    targets = jnp.asarray(TOKENS[:, 1:])

    def loss(adapters, model):
        logits = forward(model, params, TOKENS[:, :-1], adapters=adapters)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()

    # remat: the projection's shared encoder is reached from inside the checkpointed scan
    for remat in ("none", "full"):
        grads = jax.jit(jax.grad(loss), static_argnums=1)(adapters, model.replace(remat=remat))
        assert len(grads) == len(adapters)
        for grad, adapter in zip(grads, adapters, strict=True):
            assert (grad.method, grad.config) == (adapter.method, adapter.config)
            assert jax.tree.structure(grad.delta) == jax.tree.structure(adapter.delta)
            for path, g in jax.tree.leaves_with_path(grad.delta):
                g = np.asarray(g)
                assert np.isfinite(g).all() and np.abs(g).max() > 0, jax.tree_util.keystr(path)


@pytest.mark.parametrize("family", ["mistral", "gemma", "gemma2", "gemma3"])
def test_prompt_and_prefix_tuning_match_peft_across_families(family, tmp_path):
    """Gemma scales embeddings inside its embedding module (virtual tokens stay unscaled),
    and sliding-window layers see prefix keys only within the window."""
    from peft import PrefixTuningConfig as PeftPrefixTuningConfig
    from peft import PromptTuningConfig as PeftPromptTuningConfig

    hf_model = save_hf_model(family, tmp_path)
    checkpoint = load_checkpoint(tmp_path, dtype="float32")
    model, params = checkpoint.config.replace(dtype="float32"), checkpoint.params
    tokens = np.random.default_rng(3).integers(3, VOCAB, size=(2, 9))

    peft_prompt = _peft_model(hf_model, PeftPromptTuningConfig(task_type="CAUSAL_LM",
                                                               num_virtual_tokens=P))
    config = PromptTuningConfig(num_virtual_tokens=P)
    delta = prompt_from_peft({"prompt_embeddings": peft_prompt.get_prompt_embedding_to_save(
        "default").numpy()}, model, config)
    ours = forward(model, params, tokens, adapters=[Adapter(delta, PROMPT_TUNING.name, config)])
    np.testing.assert_allclose(np.asarray(ours), _peft_logits(peft_prompt, tokens)[:, P:],
                               atol=1e-4, rtol=0)

    peft_prefix = _peft_model(hf_model, PeftPrefixTuningConfig(task_type="CAUSAL_LM",
                                                               num_virtual_tokens=P))
    config = PrefixTuningConfig(num_virtual_tokens=P)
    delta = _prefix_delta_from_peft(peft_prefix.prompt_encoder["default"], model, config)
    ours = forward(model, params, tokens, adapters=[Adapter(delta, PREFIX_TUNING.name, config)])
    np.testing.assert_allclose(np.asarray(ours), _peft_logits(peft_prefix, tokens),
                               atol=1e-4, rtol=0)
