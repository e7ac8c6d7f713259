"""Stacked adapters compose in list order: at every linear, adapters[0] wraps the base
linear, adapters[1] wraps that, ... So a stack computes what merging its adapters into
the base one after another computes, under `kernels: xla` and `kernels: pallas` alike
(whose fused kernels replace only the plain base linear), with the same gradients. And a
linear site a model declares is one every method targets, with no method edited."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jft.models import ModelConfig, RopeConfig, RuntimePolicy, forward
from jft.models import sites as model_sites
from jft.models.sites import TRANSFORMER_SITES, LinearSite, linear_site
from jft.models.transformer import LayerHooks
from jft.peft import Adapter, create
from jft.peft.base import combine, partition
from tests.hf_reference import random_params

# GQA, biases on v_proj and down_proj (which fused kernels, IA3 and DoRA must treat
# right), two layers (HFT trains each linear in one of them).
MODEL = ModelConfig(
    family="qwen2", vocab_size=32, embed_dim=16, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=4, mlp_dim=24, norm_eps=1e-6, rope=RopeConfig(), layer_types=("full", "full"),
    qkv_bias=True, mlp_bias=True, policy=RuntimePolicy(dtype="float32"),
)
SITES = ("v_proj", "down_proj")  # output-side and input-side units; IA3 scales y and x
TARGETS = list(SITES)
METHODS = {
    "lora": ("lora", dict(r=2, alpha=4, targets=TARGETS)),
    "dora": ("lora", dict(r=2, alpha=4, targets=TARGETS, dora=True)),
    "ia3": ("ia3", dict(targets=TARGETS, feedforward=["down_proj"])),
    "s2ft": ("s2ft", dict(attention_modules=["v_proj"], attention_count=1,
                          mlp_modules=["down_proj"], mlp_count=5, scope="layer")),
    "spiel": ("spiel", dict(targets=TARGETS, count=12, reselection_steps=0)),
    "hft": ("hft", {}),
    "bitfit": ("bitfit", dict(targets=TARGETS)),
}
# Every pair in both orders, and one triple both ways: LoRA and S2FT on one module (each
# dropped the other under `pallas` when the first linear hook to answer won) with IA3.
TRIPLE = ("lora", "s2ft", "ia3")
STACKS = [*itertools.permutations(METHODS, 2), TRIPLE, TRIPLE[::-1]]
FUSED = ("lora", "s2ft")  # whose kernel replaces a plain base linear under `pallas`
# IA3 scales what the other changes; DoRA renormalises it (BitFit's bias it leaves alone).
NON_COMMUTING = {frozenset((a, b)) for a in ("ia3", "dora") for b in METHODS
                 if b != a and (a, b) != ("dora", "bitfit")}


def _perturbed(adapter: Adapter, seed: int) -> Adapter:
    """The adapter with random trainable leaves, so that none is the identity."""
    rng = np.random.default_rng(seed)
    trainable, frozen = partition([adapter])
    trainable = jax.tree.map(
        lambda x: x + 0.1 * jnp.asarray(rng.standard_normal(x.shape), x.dtype), trainable)
    return combine(trainable, frozen)[0]


@pytest.fixture(scope="module")
def setup():
    """(base, {name: adapter}): S2FT permutes the base, so the others are made on its
    permuted base, which every adapter then applies to."""
    params = random_params(MODEL, std=0.2)
    method, options = METHODS["s2ft"]
    base, s2ft = create(method, jax.random.key(1), params, MODEL, **options)
    adapters = {"s2ft": s2ft}
    for i, (name, (method, options)) in enumerate(METHODS.items()):
        if name != "s2ft":
            adapters[name] = create(method, jax.random.key(2 + i), base, MODEL, **options)[1]
    return base, {name: _perturbed(a, i) for i, (name, a) in enumerate(adapters.items())}


def merged_in_order(base, adapters, model=MODEL):
    """The base with each adapter merged, one after another. HFT's merge writes its own
    weights; its contribution to a stack is its change of them (active - parked), so that
    change is what is added here (the same thing when HFT comes first)."""
    params = base
    for adapter in adapters:
        if adapter.method == "hft":
            own = adapter.impl.merge(base, adapter.delta, model, adapter.config)["layers"]
            parked = adapter.delta["parked"]
            params = dict(params, layers=dict(params["layers"], **{
                name: params["layers"][name] + (own[name] - parked[name]) for name in parked}))
        else:
            params = adapter.impl.merge(params, adapter.delta, model, adapter.config)
    return params


def _inputs(model, names, seed=3):
    rng = np.random.default_rng(seed)
    out = {}
    for name in names:
        dims_in, _ = linear_site(model, name).dims(model)
        out[name] = jnp.asarray(rng.standard_normal((2, 3, *dims_in)), jnp.float32)
    return out


def stacked_linears(model, base, adapters, inputs):
    """{(site, layer): y} of each site's linear in each layer, through the adapters, as
    the layer scan runs it (edit_params, the layer's delta slice, edit_layer)."""
    params = base
    for a in adapters:
        params = a.impl.edit_params(params, a.delta, model, a.config)
    deltas = [a.impl.layer_delta(a.delta, model, a.config) for a in adapters]
    out = {}
    for i in range(model.num_layers):
        pairs = tuple((a, jax.tree.map(lambda x, i=i: x[i], d))
                      for a, d in zip(adapters, deltas, strict=True))
        hooks = LayerHooks(model, jnp.int32(i), pairs)
        layer = hooks.edit_layer(jax.tree.map(lambda x, i=i: x[i], params["layers"]))
        for name, x in inputs.items():
            out[name, i] = hooks.linear(linear_site(model, name), x, layer)
    return out


def plain_linears(model, params, inputs):
    out = {}
    for i in range(model.num_layers):
        for name, x in inputs.items():
            site = linear_site(model, name)
            y = jnp.einsum(site.equation, x, params["layers"][name][i])
            if site.bias in params["layers"]:
                y = y + params["layers"][site.bias][i]
            out[name, i] = y
    return out


def _step(model, base, adapters, inputs):
    """(value-and-grad of sum(sin(outputs)) over the trainable leaves, those leaves)."""
    trainable, frozen = partition(adapters)

    def loss(part):
        ys = stacked_linears(model, base, combine(part, frozen), inputs)
        return sum(jnp.sum(jnp.sin(y)) for y in ys.values()), ys

    return jax.value_and_grad(loss, has_aux=True), trainable


def _run(model, base, adapters, inputs):
    """(outputs, gradients, the jaxpr's text). Run op by op: dozens of stacks of tiny
    arrays cost less that way than a compilation each."""
    step, trainable = _step(model, base, adapters, inputs)
    (_, ys), grads = step(trainable)
    return ys, grads, str(jax.make_jaxpr(step)(trainable))


def _assert_trees_close(got, want, **tolerance):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                            strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w),
                                   err_msg=jax.tree_util.keystr(path), **tolerance)


def _signal(grads) -> bool:
    """Whether every float gradient of a tested site's leaves is non-zero somewhere."""
    leaves = [(jax.tree_util.keystr(path), g)
              for path, g in jax.tree_util.tree_leaves_with_path(grads)]
    return all(np.abs(np.asarray(g)).max() > 0 for path, g in leaves
               if any(site in path for site in SITES) and g.dtype == jnp.float32)


@pytest.mark.parametrize("stack", STACKS, ids="+".join)
def test_stack_equals_merging_in_order_with_xla_and_pallas(setup, stack):
    base, all_adapters = setup
    adapters = [all_adapters[name] for name in stack]
    inputs = _inputs(MODEL, SITES)
    ys, grads, jaxpr = _run(MODEL.replace(kernels="xla"), base, adapters, inputs)
    assert "pallas_call" not in jaxpr
    assert _signal(grads)
    # Only the innermost adapter sees the plain base linear, so only a stack led by LoRA
    # or S2FT runs a kernel; any other runs the very same program under `pallas`.
    if stack[0] in FUSED:
        fused_ys, fused_grads, fused_jaxpr = _run(MODEL.replace(kernels="pallas"), base,
                                                  adapters, inputs)
        assert "pallas_call" in fused_jaxpr
        _assert_trees_close(fused_ys, ys, rtol=1e-5, atol=1e-5)
        _assert_trees_close(fused_grads, grads, rtol=1e-4, atol=1e-5)
    else:
        step, trainable = _step(MODEL.replace(kernels="pallas"), base, adapters, inputs)
        assert str(jax.make_jaxpr(step)(trainable)) == jaxpr

    expected = plain_linears(MODEL, merged_in_order(base, adapters), inputs)
    _assert_trees_close(ys, expected, rtol=1e-5, atol=1e-5)
    # Where the two do not commute, the other order is another model.
    if frozenset(stack) in NON_COMMUTING:
        other = plain_linears(MODEL, merged_in_order(base, adapters[::-1]), inputs)
        assert any(not np.allclose(ys[k], other[k], atol=1e-4) for k in ys)


def test_whole_model_stack_equals_merged_model_with_xla_and_pallas(setup):
    base, all_adapters = setup
    adapters = [all_adapters[name] for name in TRIPLE]
    tokens = [[3, 1, 4, 1, 5, 9, 2], [6, 5, 3, 5, 8, 9, 7]]  # a Python list is accepted
    trainable, frozen = partition(adapters)

    def loss_and_grads(kernels):
        model = MODEL.replace(kernels=kernels)

        def loss(part):
            logits = forward(model, base, tokens, adapters=combine(part, frozen))
            return jnp.sum(jnp.sin(logits)), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)

    (_, logits), grads = loss_and_grads("xla")
    (_, fused_logits), fused_grads = loss_and_grads("pallas")
    np.testing.assert_allclose(fused_logits, logits, rtol=1e-5, atol=1e-5)
    _assert_trees_close(fused_grads, grads, rtol=1e-4, atol=1e-5)
    merged = forward(MODEL, merged_in_order(base, adapters), jnp.asarray(tokens))
    np.testing.assert_allclose(logits, merged, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- a declared site


# Two linears a family could add: an MoE-style expert matmul whose weight is stored
# [E, D, F] (here E is sized by `kv_heads`, as ModelConfig has no expert count), and a
# projection stored [out, in] as torch stores it. Neither is in jft's forward, so the
# test drives them through the layer's hooks, as the forward would.
EXPERT = LinearSite("expert_proj", "BTD,EDF->BTEF", ("embed",), ("kv_heads", "mlp"),
                    "mlp.expert_proj", "ffn_expert", bias="expert_bias")
TRANSPOSED = LinearSite("down_t", "BTF,DF->BTD", ("mlp",), ("embed",), "mlp.down_t",
                        "ffn_down_t", bias="down_t_bias")
EXTRA = ("expert_proj", "down_t")
NEW_SITES = {
    "lora": ("lora", dict(r=2, alpha=4, targets=EXTRA)),
    "dora": ("lora", dict(r=2, alpha=4, targets=EXTRA, dora=True)),
    "ia3": ("ia3", dict(targets=EXTRA, feedforward=["down_t"])),
    "bitfit": ("bitfit", dict(targets=EXTRA)),
    "spiel": ("spiel", dict(targets=EXTRA, count=12, reselection_steps=0)),
    "s2ft": ("s2ft", dict(attention_modules=[], mlp_modules=["down_t"], mlp_count=5,
                          scope="layer")),
}


@pytest.fixture
def extra_sites(monkeypatch):
    """A family whose layers also call EXPERT and TRANSPOSED, declared in one place."""
    model = MODEL.replace(family="test_extra_sites")
    monkeypatch.setitem(model_sites.FAMILY_SITES, model.family,
                        TRANSFORMER_SITES + (EXPERT, TRANSPOSED))
    return model


@pytest.mark.parametrize("name", list(NEW_SITES))
def test_methods_target_a_newly_declared_site_without_edits(extra_sites, name):
    model = extra_sites
    assert EXPERT.weight_axes == ("layers", "kv_heads", "embed", "mlp")
    assert EXPERT.low_rank_equations() == ("BTD,Dr->BTr", "BTr,rEF->BTEF")
    params = random_params(model, std=0.2)
    assert params["layers"]["expert_proj"].shape == (2, 2, 16, 24)
    params["layers"]["down_t_bias"] = jnp.full((2, 16), 0.1)
    method, options = NEW_SITES[name]
    base, adapter = create(method, jax.random.key(1), params, model, **options)
    adapter = _perturbed(adapter, 0)
    assert set(EXTRA) & set(adapter.delta["layers"])
    # Logical axes for the mesh: one name (or None) per dimension of every delta leaf.
    axes = adapter.impl.delta_axes(adapter.delta, model, adapter.config)
    for leaf, names in zip(jax.tree.leaves(adapter.delta),
                           jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)),
                           strict=True):
        assert len(names) == leaf.ndim
    inputs = _inputs(model, EXTRA)
    ys, grads, _ = _run(model.replace(kernels="xla"), base, [adapter], inputs)
    expected = plain_linears(model, merged_in_order(base, [adapter], model), inputs)
    _assert_trees_close(ys, expected, rtol=1e-5, atol=1e-5)
    if method in FUSED:
        fused_ys, fused_grads, jaxpr = _run(model.replace(kernels="pallas"), base, [adapter],
                                            inputs)
        assert ("pallas_call" in str(jaxpr)) == (not options.get("dora"))
        _assert_trees_close(fused_ys, ys, rtol=1e-5, atol=1e-5)
        _assert_trees_close(fused_grads, grads, rtol=1e-4, atol=1e-5)
