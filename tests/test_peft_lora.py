"""LoRA, rsLoRA and DoRA against PEFT on a tiny Llama, plus merge, counts and targeting."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jft.errors import JftError
from jft.models import forward
from jft.models.sites import linear_site
from jft.peft import Adapter, Targets
from jft.peft.lora import LORA, LoraConfig
from tests.hf_reference import VOCAB, hf_logits

TOKENS = np.random.default_rng(0).integers(3, VOCAB, size=(2, 11))




def _peft_model(hf_model, **lora_kwargs):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(hf_model), PeftLoraConfig(**lora_kwargs))
    with torch.no_grad():  # non-zero B so the adapter matters
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                param.add_(0.3 * torch.randn_like(param))
    return peft_model.eval()


def _delta_from_peft(peft_model, model, config):
    """PEFT's lora_A [r, in] / lora_B [out, r] laid out as jft's a [*in, r] / b [r, *out]."""
    state = {k: v.detach().numpy() for k, v in peft_model.state_dict().items()}
    layers = {}
    for module in config.targets.resolve(model):
        dims_in, dims_out = linear_site(model, module).dims(model)
        prefix = "mlp." if module in ("gate_proj", "up_proj", "down_proj") else "self_attn."
        a, b, magnitude = [], [], []
        for i in range(model.num_layers):
            path = f"base_model.model.model.layers.{i}.{prefix}{module}"
            a.append(state[f"{path}.lora_A.default.weight"].T.reshape(*dims_in, -1))
            b.append(state[f"{path}.lora_B.default.weight"].T.reshape(-1, *dims_out))
            if config.dora:
                magnitude.append(
                    state[f"{path}.lora_magnitude_vector.default.weight"].reshape(dims_out)
                )
        layers[module] = {"a": jnp.asarray(np.stack(a)), "b": jnp.asarray(np.stack(b))}
        if config.dora:
            layers[module]["magnitude"] = jnp.asarray(np.stack(magnitude))
    return {"layers": layers}


CASES = {
    "lora": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
             LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj"))),
    "rslora_all_linear": (dict(r=4, lora_alpha=6, use_rslora=True, target_modules="all-linear"),
                          LoraConfig(r=4, alpha=6, rslora=True, targets="all-linear")),
    "dora": (dict(r=4, lora_alpha=8, use_dora=True,
                  target_modules=["q_proj", "o_proj", "down_proj"]),
             LoraConfig(r=4, alpha=8, dora=True, targets=("q_proj", "o_proj", "down_proj"))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_peft_with_the_same_adapter_weights(llama, case):
    hf_model, model, params = llama
    peft_kwargs, config = CASES[case]
    peft_model = _peft_model(hf_model, **peft_kwargs)
    delta = _delta_from_peft(peft_model, model, config)
    ours = np.asarray(forward(model, params, TOKENS, adapters=[Adapter(delta, "lora", config)]))
    np.testing.assert_allclose(ours, hf_logits(peft_model, TOKENS), atol=1e-4, rtol=0)
    assert not np.allclose(ours, hf_logits(hf_model, TOKENS), atol=1e-2)


@pytest.mark.parametrize("case", list(CASES))
def test_trainable_parameter_count_equals_peft(llama, case):
    hf_model, model, params = llama
    peft_kwargs, config = CASES[case]
    trainable, _ = _peft_model(hf_model, **peft_kwargs).get_nb_trainable_parameters()
    delta = LORA.init(jax.random.key(0), params, model, config)
    assert LORA.num_params(delta, model, config) == trainable


def test_rank_pattern_and_layers_to_transform_follow_peft(llama):
    hf_model, model, params = llama
    peft_kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                       layers_to_transform=[0, 2], rank_pattern={"down_proj": 2},
                       alpha_pattern={"model.layers.2.self_attn.q_proj": 3.0})
    config = LoraConfig(r=4, alpha=8, targets=Targets(("q_proj", "down_proj"), layers=(0, 2)),
                        rank_pattern={"down_proj": 2},
                        alpha_pattern={"model.layers.2.self_attn.q_proj": 3.0})
    peft_model = _peft_model(hf_model, **peft_kwargs)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    delta = LORA.init(jax.random.key(0), params, model, config)
    assert LORA.num_params(delta, model, config) == trainable
    # Copy PEFT's factors into the padded, layer-stacked layout.
    state = {k: v.detach().numpy() for k, v in peft_model.state_dict().items()}
    for module, prefix in (("q_proj", "self_attn."), ("down_proj", "mlp.")):
        entry = delta["layers"][module]
        a, b = np.zeros(entry["a"].shape, np.float32), np.zeros(entry["b"].shape, np.float32)
        dims_in, dims_out = linear_site(model, module).dims(model)
        for i in (0, 2):
            path = f"base_model.model.model.layers.{i}.{prefix}{module}"
            lora_a = state[f"{path}.lora_A.default.weight"]
            r = lora_a.shape[0]
            a[i, ..., :r] = lora_a.T.reshape(*dims_in, r)
            b[i, :r] = state[f"{path}.lora_B.default.weight"].T.reshape(r, *dims_out)
        delta["layers"][module] = {"a": jnp.asarray(a), "b": jnp.asarray(b)}
    ours = forward(model, params, TOKENS, adapters=[Adapter(delta, "lora", config)])
    np.testing.assert_allclose(np.asarray(ours), hf_logits(peft_model, TOKENS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dora", [False, True])
def test_zero_init_is_identity_and_merge_equals_unmerged(llama, dora):
    _, model, params = llama
    config = LoraConfig(r=4, alpha=16, targets="all-linear", dora=dora)
    delta = LORA.init(jax.random.key(1), params, model, config)
    base = np.asarray(forward(model, params, TOKENS))
    fresh = forward(model, params, TOKENS, adapters=[Adapter(delta, "lora", config)])
    np.testing.assert_allclose(np.asarray(fresh), base, atol=1e-5, rtol=0)
    delta = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), delta)
    adapted = np.asarray(forward(model, params, TOKENS, adapters=[Adapter(delta, "lora", config)]))
    merged = LORA.merge(params, delta, model, config)
    np.testing.assert_allclose(np.asarray(forward(model, merged, TOKENS)), adapted, atol=1e-5,
                               rtol=0)
    if not dora:
        restored = LORA.unmerge(merged, delta, model, config)
        for ours, original in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True):
            np.testing.assert_allclose(ours, original, atol=1e-5, rtol=0)


def test_dropout_applies_only_with_an_rng(llama):
    _, model, params = llama
    config = LoraConfig(r=4, alpha=8, targets="all-linear", dropout=0.5)
    delta = LORA.init(jax.random.key(1), params, model, config)
    delta = jax.tree.map(lambda x: x + 0.1, delta)
    adapter = [Adapter(delta, "lora", config)]
    plain = forward(model, params, TOKENS, adapters=adapter)
    again = forward(model, params, TOKENS, adapters=adapter)
    dropped = forward(model, params, TOKENS, adapters=adapter, rng=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(again))
    assert not np.allclose(np.asarray(plain), np.asarray(dropped), atol=1e-3)


def test_bad_targets_and_ranks_name_the_problem(llama):
    _, model, params = llama
    with pytest.raises(JftError, match="match no module.*q_proj"):
        LORA.init(jax.random.key(0), params, model, LoraConfig(targets=r".*\.attn_q"))
    with pytest.raises(JftError, match="unknown target module 'qkv'"):
        LORA.init(jax.random.key(0), params, model, LoraConfig(targets=("qkv",)))
    with pytest.raises(JftError, match="exceeds its smaller dimension"):
        LORA.init(jax.random.key(0), params, model, LoraConfig(r=1000, targets=("q_proj",),
                                                               init="pissa"))
    with pytest.raises(JftError, match="unknown lora init 'svd'.*pissa"):
        LoraConfig(init="svd")


def test_generation_with_an_unmerged_adapter_equals_the_merged_model(llama):
    from jft.inference.generation import generate_tokens

    _, model, params = llama
    config = LoraConfig(r=4, alpha=16, targets="all-linear")
    delta = LORA.init(jax.random.key(1), params, model, config)
    delta = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(5), x.shape), delta)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    adapted = generate_tokens(model, params, prompts, 8,
                              adapters=[Adapter(delta, "lora", config)])
    merged = generate_tokens(model, LORA.merge(params, delta, model, config), prompts, 8)
    assert adapted == merged
    assert adapted != generate_tokens(model, params, prompts, 8)


def test_dora_leaves_untargeted_layers_alone_like_its_merge():
    """Training moves every magnitude; on layers outside layers_to_transform the forward
    pass must still use W unchanged, as the merge does."""
    from jft.models import ModelConfig, RopeConfig, RuntimePolicy, init_params
    from jft.peft import create

    config = ModelConfig(family="llama", vocab_size=64, embed_dim=32, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48, norm_eps=1e-6,
                         rope=RopeConfig(), layer_types=("full", "full"),
                         policy=RuntimePolicy(dtype="float32"),
    )
    params = init_params(config, jax.random.key(0), std=0.2)
    base, adapter = create("lora", jax.random.key(1), params, config, dora=True,
                           targets=["q_proj"], layers_to_transform=[0])
    delta = jax.tree.map(lambda x: x * 1.3 + 0.01, adapter.delta)
    adapter = Adapter(delta, "lora", adapter.config)
    tokens = jnp.arange(12)[None]
    merged = LORA.merge(base, delta, config, adapter.config)
    np.testing.assert_allclose(np.asarray(forward(config, base, tokens, adapters=[adapter])),
                               np.asarray(forward(config, merged, tokens)), atol=1e-5)
