"""MixLoRA and MoLA: the forward equals the papers' formulas written out in NumPy (top-k
renormalisation, the masked balance loss, MoLA's padded experts), only the delta trains,
merging and MoE bases are refused, and bad options are one clear line."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jft.errors import JftError
from jft.models import ModelConfig, MoeConfig, RopeConfig, RuntimePolicy, forward, init_params
from jft.peft import Adapter, create, make_config
from jft.peft.mixlora import AUX_KEY, MIXLORA
from jft.peft.mola import MolaConfig, layer_experts, plan

L, D, N, K, H, F, V = 3, 32, 4, 2, 8, 48, 64
MODEL = ModelConfig(
    family="llama", vocab_size=V, embed_dim=D, num_layers=L, num_heads=N, num_kv_heads=K,
    head_dim=H, mlp_dim=F, norm_eps=1e-6, rope=RopeConfig(), layer_types=("full",) * L,
    policy=RuntimePolicy(dtype="float32"),
)
TOKENS = np.random.default_rng(0).integers(0, V, size=(2, 7))
# Row 1 ends in two padding tokens: they are masked out of the balance loss.
SEGMENTS = np.array([[1] * 7, [1] * 5 + [0] * 2])
LENGTHS = SEGMENTS.sum(axis=1)


@pytest.fixture(scope="module")
def params():
    return init_params(MODEL, jax.random.key(0), std=0.2)


def _perturbed(adapter, seed):
    """The adapter with every leaf moved off its init: B no longer zero, and router logits
    of about unit size, so that tokens pick different experts (with no ties, which
    float32 probabilities that underflow to 0 would make)."""
    rng = np.random.default_rng(seed)  # on the host: no device program per leaf shape
    return adapter.with_delta(jax.tree.map(
        lambda x: jnp.asarray(np.asarray(x) + 0.3 * rng.standard_normal(x.shape), x.dtype),
        adapter.delta))


_CREATED: dict = {}


def _adapter(params, method, **options) -> Adapter:
    """A fresh adapter, made once per method and options for the whole module."""
    key = (method, repr(sorted(options.items())))
    if key not in _CREATED:
        _CREATED[key] = create(method, jax.random.key(1), params, MODEL, **options)[1]
    return _CREATED[key]


@jax.jit
def _run(params, adapters, rng=None):
    return forward(MODEL, params, jnp.asarray(TOKENS), segment_ids=jnp.asarray(SEGMENTS),
                   adapters=adapters, return_aux=True, rng=rng)


def _forward(params, adapter):
    logits, aux = _run(params, [adapter])
    return np.asarray(logits), {k: float(v) for k, v in aux.items()}


# ---------------------------------------------------------------- the NumPy reference


def _numpy(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _rms(x, w):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + MODEL.norm_eps) * w


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _rope(x, positions):
    inv = 1.0 / MODEL.rope.theta ** (np.arange(0, H, 2) / H)
    angles = positions[:, None] * inv  # [T, H/2]
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]
    first, second = x[..., :H // 2], x[..., H // 2:]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], -1)


def _top_k(p, k):
    """(chosen experts [T, k], their weights renormalised to sum to 1 [T, k])."""
    chosen = np.argsort(-p, axis=-1)[:, :k]
    weights = np.take_along_axis(p, chosen, -1)
    return chosen, weights / weights.sum(-1, keepdims=True)


def _matmul(x, w):
    """x [T, *in] through a weight [*in, *out] (jft's layout)."""
    return np.tensordot(x, w, axes=x.ndim - 1)


def _llama(params, tokens, linear, mlp):
    """Logits [T, V] of one row of real tokens. linear(name, layer, x) is every projection;
    mlp(layer, h) the feed-forward."""
    p = params["layers"]
    x = params["embed"][tokens]
    t = len(tokens)
    positions = np.arange(t, dtype=np.float64)
    causal = np.tril(np.ones((t, t), bool))
    for layer in range(L):
        h = _rms(x, p["attn_norm"][layer])
        q = _rope(linear("q_proj", layer, h), positions)  # [T, N, H]
        k = np.repeat(_rope(linear("k_proj", layer, h), positions), N // K, axis=1)
        v = np.repeat(linear("v_proj", layer, h), N // K, axis=1)
        scores = np.where(causal, np.einsum("tnh,snh->nts", q, k) * H ** -0.5, -np.inf)
        attention = np.einsum("nts,snh->tnh", _softmax(scores), v)
        x = x + linear("o_proj", layer, attention)
        x = x + mlp(layer, _rms(x, p["mlp_norm"][layer]))
    return _rms(x, params["final_norm"]) @ params["lm_head"].T


def _base_linear(params):
    return lambda name, layer, x: _matmul(x, params["layers"][name][layer])


def _mlp(linear):
    """The dense SwiGLU MLP through `linear`."""
    return lambda layer, h: linear("down_proj", layer, _silu(linear("gate_proj", layer, h))
                                   * linear("up_proj", layer, h))


def _mixlora_reference(params, adapter):
    """(logits of the real tokens per row, the balance loss): MixLoRA's formulas, each expert
    merged into its own weights, every token through its top-k experts."""
    config, delta, base = adapter.config, _numpy(adapter.delta)["layers"], _numpy(params)
    s = config.alpha / config.r
    routed = [[] for _ in range(L)]  # per layer: (probabilities, chosen) of every real token

    def expert_weight(module, layer, expert):
        weight = base["layers"][module][layer]
        if module not in config.expert_targets:
            return weight
        entry = delta["experts"][module]
        return weight + s * entry["a"][layer, expert] @ entry["b"][layer, expert]

    def linear(name, layer, x):
        y = _matmul(x, base["layers"][name][layer])
        if name in config.attention_targets:
            entry = delta["attention"][name]
            y = y + s * _matmul(_matmul(x, entry["a"][layer]), entry["b"][layer])
        return y

    def mlp(layer, h):
        p = _softmax(h @ delta["router"][layer])  # [T, E]
        chosen, weights = _top_k(p, config.top_k)
        routed[layer].append((p, chosen))
        y = np.zeros_like(h)
        for t in range(len(h)):
            for e, w in zip(chosen[t], weights[t], strict=True):
                w1, w3, w2 = (expert_weight(m, layer, e)
                              for m in ("gate_proj", "up_proj", "down_proj"))
                y[t] += w * (_silu(h[t] @ w1) * (h[t] @ w3)) @ w2
        return y

    logits = [_llama(base, TOKENS[row, :n], linear, mlp) for row, n in enumerate(LENGTHS)]
    losses = []
    for layer in range(L):
        p = np.concatenate([r[0] for r in routed[layer]])  # real tokens only
        chosen = np.concatenate([r[1] for r in routed[layer]])
        tokens = len(p)
        f = np.bincount(chosen.reshape(-1), minlength=config.num_experts) / tokens
        losses.append(config.aux_loss_coef * config.num_experts * np.sum(f * p.mean(0)))
    return logits, np.mean(losses)


def _mola_reference(params, adapter):
    """Logits of the real tokens per row: MoLA at every targeted linear, each layer's router
    over its own E_l experts only (no padding)."""
    config, delta, base = adapter.config, _numpy(adapter.delta)["layers"], _numpy(params)
    s = config.alpha / config.r
    counts = layer_experts(config, L)
    targeted = config.targets.resolve(MODEL)

    def linear(name, layer, x):
        y = _matmul(x, base["layers"][name][layer])
        if name not in delta or not targeted[name][layer]:
            return y
        entry, experts = delta[name], counts[layer]
        p = _softmax(_matmul(x, entry["router"][layer])[:, :experts])
        chosen, weights = _top_k(p, config.top_k)
        for t in range(len(x)):
            for e, w in zip(chosen[t], weights[t], strict=True):
                y[t] += w * s * _matmul(_matmul(x[t:t + 1], entry["a"][layer, e]),
                                        entry["b"][layer, e])[0]
        return y

    return [_llama(base, TOKENS[row, :n], linear, _mlp(linear))
            for row, n in enumerate(LENGTHS)]


# ---------------------------------------------------------------- MixLoRA


def test_numpy_reference_is_the_model(params):
    """The reference's own llama (no adapter) is jft's forward: the checks below test the
    adapters, not the reference."""
    base = _numpy(params)
    logits = np.asarray(forward(MODEL, params, jnp.asarray(TOKENS[:1])))[0]
    linear = _base_linear(base)
    np.testing.assert_allclose(logits, _llama(base, TOKENS[0], linear, _mlp(linear)),
                               atol=2e-4, rtol=0)


@pytest.mark.parametrize("options", [
    {},  # the paper's defaults: 8 experts, top-2, experts on gate/up/down, LoRA on q/v
    dict(num_experts=4, top_k=1, r=4, alpha=8, expert_targets=["up_proj", "down_proj"],
         attention_targets=["k_proj", "o_proj"], aux_loss_coef=0.01),
    dict(num_experts=3, top_k=3, attention_targets=[]),
])
def test_mixlora_forward_and_balance_loss_match_the_paper(params, options):
    adapter = _adapter(params, "mixlora", **options)
    adapter = _perturbed(adapter, 2)
    logits, aux = _forward(params, adapter)
    expected, balance = _mixlora_reference(params, adapter)
    for row, n in enumerate(LENGTHS):
        np.testing.assert_allclose(logits[row, :n], expected[row], atol=5e-4, rtol=1e-4)
    assert set(aux) == {AUX_KEY}
    assert aux[AUX_KEY] == pytest.approx(balance, rel=1e-4)


def test_mixlora_starts_as_the_base_model(params):
    """Every B is zero at init, so each expert is the dense MLP and the mixture is it too."""
    adapter = _adapter(params, "mixlora")
    base = np.asarray(_run(params, [])[0])
    np.testing.assert_allclose(_forward(params, adapter)[0], base, atol=1e-5)
    moved = _perturbed(adapter, 3)
    identity = moved.with_delta(MIXLORA.identity(moved.delta, params, MODEL, moved.config))
    np.testing.assert_allclose(_forward(params, identity)[0], base, atol=1e-5)


@jax.jit
def _loss(adapters, params, rng=None):
    logits, aux = _run(params, adapters, rng)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + sum(aux.values())


_grad = jax.jit(jax.grad(_loss))  # with respect to the adapters alone


def test_mixlora_trains_its_delta_only(params):
    """Router, experts and attention LoRA all get a gradient; the base is not an argument
    of the gradient at all, and the trainable count is the delta's size."""
    adapter = _adapter(params, "mixlora")
    adapter = _perturbed(adapter, 4)
    grads = _grad([adapter], params)[0].delta
    assert jax.tree.structure(grads) == jax.tree.structure(adapter.delta)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert float(jnp.abs(g).sum()) > 0, jax.tree_util.keystr(path)
    assert all(jax.tree.leaves(adapter.trainable()))
    size = sum(x.size for x in jax.tree.leaves(adapter.delta))
    # q (32 -> 32) and v (32 -> 16) LoRA, 8 experts of gate/up (32 -> 48) and down (48 -> 32),
    # the router 32 x 8, in each of 3 layers, rank 8.
    expected = L * (8 * (32 + 32) + 8 * (32 + 16) + 8 * 8 * 3 * (32 + 48) + 32 * 8)
    assert MIXLORA.num_params(adapter.delta, MODEL, adapter.config) == size == expected


def test_mixlora_training_noise_is_dropout_and_jitter_only(params):
    adapter = _perturbed(_adapter(params, "mixlora"), 5)
    adapter = Adapter(adapter.delta, "mixlora", dataclasses.replace(adapter.config, jitter=0.1,
                                                                    dropout=0.1))
    plain = _loss([adapter], params)
    noisy = _loss([adapter], params, jax.random.key(0))
    assert np.isfinite(float(noisy)) and float(noisy) != float(plain)
    quiet = Adapter(adapter.delta, "mixlora", dataclasses.replace(adapter.config, jitter=0.0,
                                                                  dropout=0.0))
    assert float(_loss([quiet], params, jax.random.key(0))) == pytest.approx(float(plain), 1e-6)


def test_mixlora_axes_name_every_dimension(params):
    adapter = _adapter(params, "mixlora")
    axes = MIXLORA.delta_axes(adapter.delta, MODEL, adapter.config)
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    for leaf, names in zip(jax.tree.leaves(adapter.delta), flat_axes, strict=True):
        assert len(names) == leaf.ndim
    layers = axes["layers"]
    assert layers["router"] == ("layers", "embed", None)
    assert layers["experts"]["down_proj"] == {"a": ("layers", None, "mlp", None),
                                              "b": ("layers", None, None, "embed")}
    assert layers["attention"]["q_proj"]["b"] == ("layers", None, "heads", "head_dim")


def test_mixlora_refuses_to_merge_and_moe_bases(params):
    adapter = _adapter(params, "mixlora")
    with pytest.raises(JftError, match="mixlora cannot be merged"):
        adapter.impl.merge(params, adapter.delta, MODEL, adapter.config)
    moe = MODEL.replace(moe=MoeConfig(num_experts=4, top_k=2, expert_mlp_dim=16))
    moe_params = init_params(moe, jax.random.key(0))
    with pytest.raises(JftError, match="mixture-of-experts"):
        create("mixlora", jax.random.key(1), moe_params, moe)
    with pytest.raises(JftError, match="mixture of experts already"):
        MIXLORA.init(jax.random.key(1), moe_params, moe, adapter.config)


# ---------------------------------------------------------------- MoLA


@pytest.mark.parametrize("options, experts", [
    # Per layer, uneven: layer 1 has fewer experts than the padded 4 (masked, -inf).
    (dict(experts_per_layer=[3, 2, 4]), (3, 2, 4)),
    # Two groups spread over 3 layers, q and down only, layer 1 untargeted, top-1.
    (dict(experts_per_layer=[2, 4], targets=["q_proj", "down_proj"], layers_to_transform=[0, 2],
          top_k=1, r=4, alpha=4), (2, 0, 4)),
])
def test_mola_forward_matches_the_paper(params, options, experts):
    adapter = _adapter(params, "mola", **options)
    modules = plan(MODEL, adapter.config)
    assert {m: p.experts for m, p in modules.items()} == dict.fromkeys(modules, experts)
    adapter = _perturbed(adapter, 6)  # every slot moved, padding too
    logits, aux = _forward(params, adapter)
    assert aux == {}
    expected = _mola_reference(params, adapter)
    for row, n in enumerate(LENGTHS):  # float32 against float64, activations of size ~10
        np.testing.assert_allclose(logits[row, :n], expected[row], atol=5e-4, rtol=1e-4)


def test_mola_padded_experts_get_no_gradient_and_no_count(params):
    adapter = _adapter(params, "mola", experts_per_layer=[3, 2, 4])
    init = adapter.delta["layers"]["q_proj"]
    assert not np.any(np.asarray(init["a"][1, 2:])) and not np.any(np.asarray(init["b"]))
    assert not np.any(np.asarray(init["router"][1, :, 2:]))
    adapter = _perturbed(adapter, 7)
    grads = _grad([adapter], params)[0].delta["layers"]
    for module, g in grads.items():
        for name in ("a", "b"):
            assert not np.any(np.asarray(g[name][0, 3:])), (module, name)
            assert not np.any(np.asarray(g[name][1, 2:])), (module, name)
            assert np.all(np.abs(np.asarray(g[name][2])).sum(axis=tuple(
                range(1, g[name].ndim - 1))) > 0), (module, name)
        assert not np.any(np.asarray(g["router"][1][..., 2:])), module
        assert np.abs(np.asarray(g["router"][2])).sum() > 0, module
    # 3 + 2 + 4 experts of rank 8 and router columns on each of the seven linears.
    sizes = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
             "gate_proj": (32, 48), "up_proj": (32, 48), "down_proj": (48, 32)}
    expected = sum(9 * (8 * (i + o) + i) for i, o in sizes.values())
    assert adapter.impl.num_params(adapter.delta, MODEL, adapter.config) == expected


def test_mola_experts_per_layer_spreads_groups_evenly():
    def counts(value, layers):
        return layer_experts(MolaConfig(experts_per_layer=value), layers)

    assert counts((2, 4, 6, 8), 32) == (2,) * 8 + (4,) * 8 + (6,) * 8 + (8,) * 8
    assert counts((2, 4, 6, 8), 30) == (2,) * 8 + (4,) * 7 + (6,) * 8 + (8,) * 7
    assert counts(5, 4) == (5, 5, 5, 5)
    assert counts((2, 3, 4), 3) == (2, 3, 4)
    with pytest.raises(JftError, match="method.experts_per_layer: .* 4 entries for a model of 3"):
        counts((2, 4, 6, 8), 3)


def test_mola_refuses_to_merge(params):
    adapter = _adapter(params, "mola", experts_per_layer=[3, 2, 4])
    with pytest.raises(JftError, match="mola cannot be merged"):
        adapter.impl.merge(params, adapter.delta, MODEL, adapter.config)


# ---------------------------------------------------------------- bad options


@pytest.mark.parametrize("method, options, message", [
    ("mixlora", {"top_k": 9}, "mixlora top_k 9 exceeds num_experts 8"),
    ("mixlora", {"num_experts": 0}, "mixlora num_experts must be a positive integer"),
    ("mixlora", {"expert_targets": ["q_proj"]}, "mixlora expert_targets has 'q_proj'"),
    ("mixlora", {"expert_targets": []}, "mixlora expert_targets is empty"),
    ("mixlora", {"attention_targets": ["up_proj"]}, "mixlora attention_targets has 'up_proj'"),
    ("mixlora", {"dropout": 1.0}, "mixlora dropout must be in"),
    ("mixlora", {"aux_loss_coef": -1}, "mixlora aux_loss_coef must be a finite number >= 0"),
    ("mixlora", {"experts": 8}, "unknown option 'experts' for method 'mixlora'"),
    ("mola", {"experts_per_layer": [2, 1]}, "has a layer with 1 experts, fewer than top_k 2"),
    ("mola", {"experts_per_layer": []}, "mola experts_per_layer must be a positive integer"),
    ("mola", {"top_k": 0}, "mola top_k must be a positive integer"),
    ("mola", {"targets": ["gate"]}, None),  # checked against the model, below
])
def test_bad_options_are_one_line(params, method, options, message):
    if message is None:
        with pytest.raises(JftError) as error:
            create(method, jax.random.key(1), params, MODEL, experts_per_layer=2, **options)
        assert str(error.value).startswith("method.targets: unknown target module 'gate'")
    else:
        with pytest.raises(JftError, match=message) as error:
            make_config(method, options)
    assert "\n" not in str(error.value)


def test_run_config_names_the_bad_key():
    from jft.training.config import load_config

    base = ["model=smollm2-135m-instruct", "data.train=examples/quickstart/train.jsonl",
            "output_dir=/tmp/unused"]
    with pytest.raises(JftError, match=r"method\.top_k") as error:
        load_config(None, [*base, "method.name=mixlora", "method.top_k=two"])
    assert "\n" not in str(error.value)
    with pytest.raises(JftError, match=r"method\.top_k: .*exceeds num_experts") as error:
        load_config(None, [*base, "method.name=mixlora", "method.top_k=3",
                           "method.num_experts=2"])
    config = load_config(None, [*base, "method.name=mola", "method.experts_per_layer=[2,4]"])
    assert config.method.config.experts_per_layer == (2, 4)
