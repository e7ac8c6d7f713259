"""Full fine-tuning, IA3, BitFit, norm tuning and SSF: identity at init, exact merges,
parity and trainable counts against PEFT, gradients, and bad targets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jft.errors import JftError
from jft.models import ModelConfig, RopeConfig, RuntimePolicy, config_from_hf, forward, param_shapes
from jft.models.sites import linear_site
from jft.peft import Adapter, Targets, bitfit, full, ia3, norm_tuning, ssf
from tests.hf_reference import VOCAB, hf_logits, make_hf_model, random_params

_logits = jax.jit(forward, static_argnums=0)


# qkv biases to train (q/k/v) and biases to create (o, gate, up, down); every kind of norm.
MODEL = ModelConfig(
    family="qwen3", vocab_size=32, embed_dim=16, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=4, mlp_dim=24, norm_eps=1e-6, rope=RopeConfig(), layer_types=("full", "full"),
    qkv_bias=True, qk_norm=True, post_norms=True, policy=RuntimePolicy(dtype="float32"),
)
KEY = jax.random.key(0)  # the inits here ignore it
TOKENS = np.random.default_rng(0).integers(0, 32, size=(2, 7))

METHODS = {
    "full": (full.FULL, full.FullConfig()),
    "full_some": (full.FULL, full.FullConfig(params=("embed", "q_proj", "mlp_norm"))),
    "ia3_all_linear": (ia3.IA3, ia3.IA3Config(targets="all-linear",
                                              feedforward=("o_proj", "down_proj"))),
    "ia3_some_layers": (ia3.IA3, ia3.IA3Config(targets=Targets(("q_proj", "down_proj"), (1,)),
                                               feedforward=("down_proj",))),
    "bitfit": (bitfit.BITFIT, bitfit.BitFitConfig()),
    "bitfit_some_layers": (bitfit.BITFIT, bitfit.BitFitConfig(Targets(("q_proj", "up_proj"),
                                                                      (0,)))),
    "norm_tuning": (norm_tuning.NORM_TUNING, norm_tuning.NormTuningConfig()),
    "norm_tuning_all": (norm_tuning.NORM_TUNING, norm_tuning.NormTuningConfig("all", (1,))),
    "ssf": (ssf.SSF, ssf.SsfConfig()),
    "ssf_some_layers": (ssf.SSF, ssf.SsfConfig(Targets(("k_proj", "o_proj"), (1,)))),
}


@pytest.fixture(scope="module")
def base():
    return random_params(MODEL)


def _randomised(delta, seed=1):
    """Every leaf moved by N(0, 0.2) noise (numpy, so nothing compiles)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: x + jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype), delta)


def _close(a, b, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)


@pytest.mark.parametrize("case", list(METHODS))
def test_fresh_delta_leaves_logits_unchanged(base, case):
    method, config = METHODS[case]
    delta = method.init(KEY, base, MODEL, config)
    expected = _logits(MODEL, base, TOKENS)
    _close(_logits(MODEL, base, TOKENS, adapters=[Adapter(delta, method.name, config)]), expected)
    # identity() of a trained delta is the same no-op
    identity = method.identity(_randomised(delta), base, MODEL, config)
    assert jax.tree.structure(identity) == jax.tree.structure(delta)
    _close(_logits(MODEL, base, TOKENS, adapters=[Adapter(identity, method.name, config)]),
           expected)


@pytest.mark.parametrize("case", list(METHODS))
def test_merged_forward_equals_unmerged_and_unmerge_restores_base(base, case):
    method, config = METHODS[case]
    delta = _randomised(method.init(KEY, base, MODEL, config))
    unmerged = _logits(MODEL, base, TOKENS, adapters=[Adapter(delta, method.name, config)])
    assert np.abs(np.asarray(unmerged - _logits(MODEL, base, TOKENS))).max() > 1e-3
    merged = method.merge(base, delta, MODEL, config)
    assert merged["layers"]["q_proj"].dtype == jnp.float32
    _close(_logits(MODEL, merged, TOKENS), unmerged)
    if method is full.FULL:
        with pytest.raises(JftError, match="cannot be unmerged"):
            method.unmerge(merged, delta, MODEL, config)
        return
    restored = method.unmerge(merged, delta, MODEL, config)
    assert jax.tree.structure(restored) == jax.tree.structure(base)
    jax.tree.map(lambda a, b: _close(a, b, atol=1e-6), restored, base)


def test_merge_casts_back_to_the_base_dtype(base):
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    for method, config in METHODS.values():
        delta = _randomised(method.init(KEY, bf16, MODEL, config))
        merged = method.merge(bf16, delta, MODEL, config)
        assert {x.dtype for x in jax.tree.leaves(merged)} == {jnp.dtype(jnp.bfloat16)}


def test_grad_over_adapters_differentiates_only_the_deltas(base):
    # One stack of all five methods (one compile); each delta gets its own gradients.
    cases = ["full", "ia3_some_layers", "bitfit", "norm_tuning_all", "ssf_some_layers"]
    adapters = [Adapter(m.init(KEY, base, MODEL, c), m.name, c)
                for m, c in (METHODS[case] for case in cases)]

    def loss(adapters):  # the base is a closed-over constant, not an argument
        return jnp.mean(jnp.square(forward(MODEL, base, TOKENS, adapters=adapters)))

    grads = jax.jit(jax.grad(loss))(adapters)
    for case, adapter, grad in zip(cases, adapters, grads, strict=True):
        assert isinstance(grad, Adapter) and grad.method == adapter.method
        assert jax.tree.structure(grad.delta) == jax.tree.structure(adapter.delta)
        one_layer = case in ("ia3_some_layers", "norm_tuning_all", "ssf_some_layers")
        for path, g in jax.tree.flatten_with_path(grad.delta)[0]:
            g = np.asarray(g)
            assert np.isfinite(g).all() and np.abs(g).max() > 0, (case, path)
            if one_layer and path[0].key == "layers":  # targeted on layer 1 only
                assert np.abs(g[0]).max() == 0, (case, path)


def test_full_delta_is_the_base_arrays_and_counts_all_params(base):
    delta = full.FULL.init(KEY, base, MODEL, full.FullConfig())
    assert delta["layers"]["q_proj"] is base["layers"]["q_proj"] and delta["embed"] is base["embed"]
    assert full.FULL.num_params(delta, MODEL, full.FullConfig()) == MODEL.num_params()
    some = full.FullConfig(params=("embed", "q_proj"))
    expected = base["embed"].size + base["layers"]["q_proj"].size
    assert full.FULL.num_params(full.FULL.init(None, base, MODEL, some), MODEL, some) == expected


# ------------------------------------------------------------------------- BitFit


def _tiny(family, **switches):
    return MODEL.replace(**{"family": family, "qkv_bias": False, "qk_norm": False,
                            "post_norms": False, **switches})


def test_bitfit_adds_zero_biases_to_a_model_without_biases():
    model = _tiny("llama")
    params = random_params(model)
    assert not any(k.endswith("_bias") for k in params["layers"])
    config = bitfit.BitFitConfig()
    delta = bitfit.BITFIT.init(KEY, params, model, config)
    assert {k: v.shape[1:] for k, v in delta["layers"].items()} == {
        m: linear_site(model, m).dims(model)[1] for m in ("q_proj", "k_proj", "v_proj",
                                                          "o_proj", "gate_proj", "up_proj",
                                                          "down_proj")}
    assert all(not np.asarray(v).any() for v in delta["layers"].values())
    merged = bitfit.BITFIT.merge(params, _randomised(delta), model, config)
    created = {"q_bias", "k_bias", "v_bias", "o_bias", "gate_bias", "up_bias", "down_bias"}
    assert created <= set(merged["layers"])
    assert bitfit.BITFIT.num_params(delta, model, config) == 2 * (16 + 8 + 8 + 16 + 24 + 24 + 16)
    restored = bitfit.BITFIT.unmerge(merged, _randomised(delta), model, config)
    assert set(restored["layers"]) == set(params["layers"])


def test_bitfit_trains_the_existing_biases_of_a_model_with_them():
    model = _tiny("qwen2", qkv_bias=True)
    params = random_params(model)
    config = bitfit.BitFitConfig(targets=("q_proj", "k_proj", "v_proj"))
    delta = bitfit.BITFIT.init(KEY, params, model, config)
    assert {m: v.shape for m, v in delta["layers"].items()} == {
        f"{m}_proj": params["layers"][f"{m}_bias"].shape for m in "qkv"}

    @jax.jit
    def grads(delta, params):  # one backward pass: d loss / d delta and / d bias
        def loss(d, p):
            return jnp.sum(jnp.square(forward(model, p, TOKENS,
                                              adapters=[Adapter(d, "bitfit", config)])))

        g_delta, g_params = jax.grad(loss, argnums=(0, 1))(delta, params)
        return g_delta["layers"], g_params["layers"]

    grad_delta, grad_base = grads(delta, params)
    for m in "qkv":
        assert np.abs(np.asarray(grad_base[f"{m}_bias"])).max() > 0
        _close(grad_delta[f"{m}_proj"], grad_base[f"{m}_bias"], atol=1e-4)
    trained = _randomised(delta)
    merged = bitfit.BITFIT.merge(params, trained, model, config)
    assert set(merged["layers"]) == set(params["layers"])  # nothing created
    _close(merged["layers"]["q_bias"], params["layers"]["q_bias"] + trained["layers"]["q_proj"])


# ------------------------------------------------------------------------- vs PEFT




IA3_CASES = {
    "defaults": (dict(target_modules=["k_proj", "v_proj", "down_proj"],
                      feedforward_modules=["down_proj"]), ia3.IA3Config()),
    "regex_layers_0_2": (
        dict(target_modules=r"model\.layers\.[02]\..*_proj",
             feedforward_modules=["o_proj", "down_proj"]),
        ia3.IA3Config(targets=r"model\.layers\.[02]\..*_proj",
                      feedforward=("o_proj", "down_proj"))),
}


def _peft_ia3(hf_model, kwargs):
    import copy

    import torch
    from peft import IA3Config, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(hf_model), IA3Config(**kwargs))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "ia3_l" in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
    return peft_model.eval()


def _ia3_delta_from_peft(peft_model, model, config):
    state = {k: v.detach().numpy() for k, v in peft_model.state_dict().items()}
    layers = {}
    for module, p in ia3.plan(model, config).items():
        dims_in, dims_out = linear_site(model, module).dims(model)
        prefix = "mlp." if module in ("gate_proj", "up_proj", "down_proj") else "self_attn."
        dims = dims_in if p.feedforward else dims_out
        vectors = []
        for i in range(model.num_layers):
            key = f"base_model.model.model.layers.{i}.{prefix}{module}.ia3_l.default"
            vectors.append(state[key].reshape(dims) if key in state else np.ones(dims))
        layers[module] = jnp.asarray(np.stack(vectors), jnp.float32)
    return {"layers": layers}


@pytest.mark.parametrize("case", list(IA3_CASES))
def test_ia3_logits_and_trainable_count_equal_peft(llama, case):
    hf_model, model, params = llama
    peft_kwargs, config = IA3_CASES[case]
    peft_model = _peft_ia3(hf_model, peft_kwargs)
    delta = _ia3_delta_from_peft(peft_model, model, config)
    tokens = np.random.default_rng(0).integers(3, VOCAB, size=(2, 11))
    ours = _logits(model, params, tokens, adapters=[Adapter(delta, "ia3", config)])
    np.testing.assert_allclose(np.asarray(ours), hf_logits(peft_model, tokens), atol=1e-4, rtol=0)
    assert ia3.IA3.num_params(delta, model, config) == peft_model.get_nb_trainable_parameters()[0]


LN_CASES = {  # (family, PEFT LNTuningConfig kwargs, ours, the jft leaves it tunes)
    "llama": ("llama", dict(target_modules=["input_layernorm", "post_attention_layernorm",
                                            "norm"]),
              norm_tuning.NormTuningConfig(), {"attn_norm", "mlp_norm", "final_norm"}),
    "gemma2_peft_default": ("gemma2", dict(), norm_tuning.NormTuningConfig(
        ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
         "post_feedforward_layernorm", "norm")),
        {"attn_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm", "final_norm"}),
    "qwen3_qk_norms": ("qwen3", dict(target_modules=["q_norm", "k_norm", "norm"]),
                       norm_tuning.NormTuningConfig(("q_norm", "k_norm", "final_norm")),
                       {"q_norm", "k_norm", "final_norm"}),
}


@pytest.mark.parametrize("case", list(LN_CASES))
def test_norm_tuning_trainable_count_equals_peft_ln_tuning(case):
    from peft import LNTuningConfig, get_peft_model

    family, peft_kwargs, config, leaves = LN_CASES[case]
    hf_model = make_hf_model(family)
    model = config_from_hf(hf_model.config.to_dict(), family)
    peft_model = get_peft_model(hf_model, LNTuningConfig(**peft_kwargs))
    base = jax.tree.map(jnp.zeros, param_shapes(model), is_leaf=lambda x: isinstance(x, tuple))
    delta = norm_tuning.NORM_TUNING.init(KEY, base, model, config)
    assert set(delta["layers"]) | ({"final_norm"} & set(delta)) == leaves
    expected = peft_model.get_nb_trainable_parameters()[0]
    assert norm_tuning.NORM_TUNING.num_params(delta, model, config) == expected
    assert sum(x.size for x in jax.tree.leaves(delta)) == expected


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("method, config", [
    (ia3.IA3, ia3.IA3Config(targets=r".*\.attn\.qkv", feedforward=())),
    (bitfit.BITFIT, bitfit.BitFitConfig(targets=r"model\.layers\.9\..*")),
    (ssf.SSF, ssf.SsfConfig(targets=r"nothing")),
], ids=["ia3", "bitfit", "ssf"])
def test_target_matching_nothing_raises_naming_valid_modules(base, method, config):
    with pytest.raises(JftError, match="match no module; valid: q_proj, k_proj"):
        method.init(KEY, base, MODEL, config)


def test_unknown_names_raise_naming_the_valid_ones(base):
    with pytest.raises(JftError, match="unknown target module 'qkv_proj'; valid: q_proj"):
        ssf.SSF.init(None, base, MODEL, ssf.SsfConfig(targets=("qkv_proj",)))
    with pytest.raises(JftError, match="'layernorm' is not in this qwen3 model; valid: attn_norm"):
        norm_tuning.NORM_TUNING.init(None, base, MODEL, norm_tuning.NormTuningConfig("layernorm"))
    model = _tiny("llama")
    with pytest.raises(JftError, match="'post_attn_norm' is not in this llama model"):
        norm_tuning.NORM_TUNING.init(None, random_params(model), model,
                                     norm_tuning.NormTuningConfig(("post_attn_norm",)))
    with pytest.raises(JftError, match="'wte' is not in this model; valid: embed"):
        full.FULL.init(None, base, MODEL, full.FullConfig(params=("wte",)))
    with pytest.raises(JftError, match="feedforward must be a subset of targets"):
        ia3.IA3Config(targets=("k_proj", "v_proj"), feedforward=("down_proj",))
    with pytest.raises(JftError, match="unknown ia3 feedforward module 'fc2'"):
        ia3.IA3Config(feedforward=("fc2",))
