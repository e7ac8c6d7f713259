"""S2FT: co-permutation keeps the function, partial backprop equals dense masked autodiff
and saves only the block's inputs, merge/split round trips, side-by-side serving,
selection strategies against HF/torch, gradient accumulation and sharding."""

from __future__ import annotations

import contextlib
import io
import re

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jft.errors import JftError
from jft.models import ModelConfig, RopeConfig, RuntimePolicy, forward
from jft.models.sites import linear_site
from jft.models.transformer import Linear
from jft.peft import Adapter, create, s2ft
from jft.peft.named import forward_per_row
from jft.peft.optim import masked_optimizer
from jft.training.config import wrap_accumulation
from tests.hf_reference import VOCAB, random_params
from tests.steps import one_device_steps

_logits = jax.jit(forward, static_argnums=0)

# GQA (2 query heads per KV head) with every bias the permutation has to move.
MODEL = ModelConfig(
    family="qwen2", vocab_size=32, embed_dim=16, num_layers=3, num_heads=4, num_kv_heads=2,
    head_dim=4, mlp_dim=24, norm_eps=1e-6, rope=RopeConfig(), layer_types=("full",) * 3,
    qkv_bias=True, o_bias=True, mlp_bias=True, policy=RuntimePolicy(dtype="float32"),
)
ALL = dict(attention_modules=list(s2ft.ATTENTION), mlp_modules=list(s2ft.MLP))
TOKENS = np.random.default_rng(0).integers(0, 32, size=(2, 7))


@pytest.fixture(scope="module")
def params():
    return random_params(MODEL)


def _perturbed(adapter, seed=1, scale=0.2):
    """The adapter with random blocks (a trained-looking point, not the zero init)."""
    rng = np.random.default_rng(seed)
    delta = jax.tree.map(
        lambda x: x + scale * jnp.asarray(rng.standard_normal(x.shape), x.dtype)
        if x.dtype == jnp.float32 else x, adapter.delta)
    return Adapter(delta, adapter.method, adapter.config)


def _units(adapter, group):
    """Per layer, the original ids of the selected units."""
    entry = adapter.delta["layers"][group]
    ids = np.asarray(entry["perm"] if "perm" in entry else entry["units"])
    return [ids[layer, :count] for layer, count in enumerate(np.asarray(entry["count"]))]


def test_copermutation_leaves_the_function_unchanged(params):
    # Select by smallest weight norm so the chosen units are not simply the first ones.
    base, adapter = create("s2ft", jax.random.key(0), params, MODEL, attention_ratio=0.5,
                           mlp_ratio=0.25, selection="weight", largest=False, **ALL)
    perms = {g: adapter.delta["layers"][g]["perm"] for g in ("attention", "mlp")}
    assert any((np.asarray(p) != np.arange(p.shape[1])).any() for p in perms.values())
    moved = base["layers"]["gate_proj"]
    assert not np.array_equal(np.asarray(moved), np.asarray(params["layers"]["gate_proj"]))
    np.testing.assert_allclose(_logits(MODEL, base, TOKENS), _logits(MODEL, params, TOKENS),
                               atol=2e-5)
    # A fresh adapter (zero blocks) on the permuted base is the same model too.
    np.testing.assert_allclose(_logits(MODEL, base, TOKENS, adapters=(adapter,)),
                               _logits(MODEL, params, TOKENS), atol=2e-5)
    restored = s2ft.permute(base, perms, MODEL, inverse=True)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(got, want)


def _dense_weights(adapter, model, base_params):
    """The merged weights in original coordinates, built with numpy from the blocks and
    the unit ids: an independent formulation of what the adapter trains."""
    groups = model.num_heads // model.num_kv_heads
    out = {}
    for group, modules in adapter.config.groups().items():
        units = _units(adapter, group)
        for module in modules:
            weight = np.array(base_params["layers"][module])
            block = np.asarray(adapter.delta["layers"][module])
            axis = s2ft._unit_axis(linear_site(model, module))
            for layer, ids in enumerate(units):
                if module in ("q_proj", "o_proj"):
                    ids = (ids[:, None] * groups + np.arange(groups)).reshape(-1)
                w = np.moveaxis(weight[layer], axis - 1, 0)
                b = np.moveaxis(block[layer], axis - 1, 0)
                w[ids] += b[: len(ids)]
            out[module] = weight
    return out


def test_partial_backprop_gradients_equal_dense_masked_autodiff(params):
    base, adapter = create("s2ft", jax.random.key(3), params, MODEL, attention_ratio=0.5,
                           mlp_ratio=0.3, **ALL)
    adapter = _perturbed(adapter)
    tokens = jnp.asarray(TOKENS)

    def loss_blocks(delta):
        a = Adapter(delta, adapter.method, adapter.config)
        return jnp.sum(jnp.sin(forward(MODEL, base, tokens, adapters=(a,))))

    def loss_dense(weights):
        p = dict(params, layers=dict(params["layers"], **weights))
        return jnp.sum(jnp.sin(forward(MODEL, p, tokens)))

    dense = _dense_weights(adapter, MODEL, params)
    np.testing.assert_allclose(loss_blocks(adapter.delta), loss_dense(dense), rtol=1e-5)
    block_grads = jax.grad(loss_blocks, allow_int=True)(adapter.delta)["layers"]
    dense_grads = jax.grad(loss_dense)({m: jnp.asarray(w) for m, w in dense.items()})
    groups = MODEL.num_heads // MODEL.num_kv_heads
    for group, modules in adapter.config.groups().items():
        for module in modules:
            axis = s2ft._unit_axis(linear_site(MODEL, module)) - 1
            for layer, ids in enumerate(_units(adapter, group)):
                if module in ("q_proj", "o_proj"):
                    ids = (ids[:, None] * groups + np.arange(groups)).reshape(-1)
                got = np.moveaxis(np.asarray(block_grads[module][layer]), axis, 0)
                want = np.moveaxis(np.asarray(dense_grads[module][layer]), axis, 0)[ids]
                # Gradients of sum(sin(logits)) reach ~10: float32 agreement is relative
                # to the module's gradient scale.
                scale = max(1.0, float(np.abs(dense_grads[module]).max()))
                np.testing.assert_allclose(got[: len(ids)], want, atol=1e-4 * scale,
                                           err_msg=module)
                assert not got[len(ids):].any(), "padding slots must get no gradient"


class _Layer:
    def __init__(self, config, index):
        self.config, self.index, self.rng = config, index, None


def _residual_shapes(fn, *args) -> list[tuple[int, ...]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(fn, *args)
    return [tuple(int(d) for d in m.split(",") if d) for m in
            re.findall(r"\[([\d,]*)\]", out.getvalue())]


@pytest.mark.parametrize("module", ["down_proj", "o_proj", "up_proj"])
def test_backward_saves_only_what_the_block_gradient_needs(params, module):
    _, adapter = create("s2ft", jax.random.key(0), params, MODEL, attention_ratio=0.5,
                        attention_modules=["o_proj"], mlp_ratio=0.25,
                        mlp_modules=["down_proj", "up_proj"], scope="layer")
    delta_layer = jax.tree.map(lambda x: x[0], adapter.delta["layers"])
    weight = params["layers"][module][0]
    x_shape = {"down_proj": (2, 7, 24), "o_proj": (2, 7, 4, 4), "up_proj": (2, 7, 16)}[module]
    equation = {"down_proj": "BTF,FD->BTD", "o_proj": "BTNH,NHD->BTD",
                "up_proj": "BTD,DF->BTF"}[module]
    x = jnp.asarray(np.random.default_rng(0).standard_normal(x_shape), jnp.float32)

    site = linear_site(MODEL, module)

    def linear(x, block):  # the frozen matmul plus the S2FT branch, as the model runs it
        layer, layer_delta = _Layer(MODEL, 0), dict(delta_layer, **{module: block})
        y = adapter.impl.linear(site, x, Linear(site, weight, None, layer), adapter.delta,
                                layer_delta, layer, adapter.config)
        return jnp.sum(jnp.sin(y))

    shapes = _residual_shapes(linear, x, delta_layer[module])
    slots = delta_layer[module].shape[s2ft._unit_axis(site) - 1]
    y_shape = jnp.einsum(equation, x, weight).shape
    if module == "up_proj":  # output side: dB = x^T dy needs the whole input
        needed = x_shape
    else:  # input side: only the selected units' input columns
        needed = (2, 7, slots) + ((4,) if module == "o_proj" else ())
    activations = {shape for shape in shapes if shape[:2] == (2, 7)}
    # The block's input, and the cosine of the test's sin(y); nothing else per token (the
    # frozen W, kept for dx, is a constant, not an activation).
    assert activations == {needed, y_shape}, shapes


def test_merge_and_split_round_trips(params):
    base, adapter = create("s2ft", jax.random.key(5), params, MODEL, attention_ratio=0.5,
                           mlp_ratio=0.25, **ALL)
    adapter = _perturbed(adapter)
    trained = _logits(MODEL, base, TOKENS, adapters=(adapter,))
    merged = adapter.impl.merge(base, adapter.delta, MODEL, adapter.config)
    np.testing.assert_allclose(_logits(MODEL, merged, TOKENS), trained, atol=2e-5)
    # In place: unmerging the permuted base gives it back (to float32 rounding).
    back = adapter.impl.unmerge(merged, adapter.delta, MODEL, adapter.config)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(base), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)

    delta, config = adapter.impl.split(adapter.delta, MODEL, adapter.config)
    split = Adapter(delta, "s2ft", config)
    assert config.layout == "indexed" and "perm" not in delta["layers"]["mlp"]
    assert adapter.impl.rebase(params, delta, MODEL, config) is params
    np.testing.assert_allclose(_logits(MODEL, params, TOKENS, adapters=(split,)), trained,
                               atol=2e-5)
    # The split adapter merged into the unpermuted base is, bit for bit, the permuted merge
    # put back in the original order.
    merged_plain = split.impl.merge(params, delta, MODEL, config)
    perms = {g: adapter.delta["layers"][g]["perm"] for g in ("attention", "mlp")}
    unpermuted = s2ft.permute(merged, perms, MODEL, inverse=True)
    for got, want in zip(jax.tree.leaves(merged_plain), jax.tree.leaves(unpermuted), strict=True):
        np.testing.assert_array_equal(got, want)
    for module, want in _dense_weights(split, MODEL, params).items():
        np.testing.assert_allclose(merged_plain["layers"][module], want, atol=1e-6)
    removed = split.impl.unmerge(merged_plain, delta, MODEL, config)
    for got, want in zip(jax.tree.leaves(removed), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_split_adapters_serve_side_by_side(params):
    split = []
    for seed in (1, 2):
        _, adapter = create("s2ft", jax.random.key(seed), params, MODEL, attention_ratio=0.5,
                            mlp_ratio=0.25, scope="layer", **ALL)
        adapter = _perturbed(adapter, seed=seed)
        delta, config = adapter.impl.split(adapter.delta, MODEL, adapter.config)
        split.append(Adapter(delta, "s2ft", config))
    assert not np.array_equal(split[0].delta["layers"]["mlp"]["units"],
                              split[1].delta["layers"]["mlp"]["units"])
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 32, size=(3, 7)))
    logits = forward_per_row(MODEL, params, tokens, jnp.asarray([1, -1, 0]),
                             [[split[0]], [split[1]]])
    expected = [_logits(MODEL, params, tokens[1:2], adapters=(split[1],)),
                _logits(MODEL, params, tokens[1:2]),
                _logits(MODEL, params, tokens[2:3], adapters=(split[0],))]
    np.testing.assert_allclose(logits[0], _logits(MODEL, params, tokens[:1],
                                                  adapters=(split[1],))[0], atol=2e-5)
    np.testing.assert_allclose(logits[1], expected[1][0], atol=2e-5)
    np.testing.assert_allclose(logits[2], expected[2][0], atol=2e-5)


def test_counts_per_layer_and_global(params):
    _, per_layer = create("s2ft", jax.random.key(0), params, MODEL, mlp_count=3, scope="layer")
    assert np.asarray(per_layer.delta["layers"]["mlp"]["count"]).tolist() == [3, 3, 3]
    _, pooled = create("s2ft", jax.random.key(0), params, MODEL, mlp_ratio=0.25)
    counts = np.asarray(pooled.delta["layers"]["mlp"]["count"])
    assert counts.sum() == round(0.25 * 3 * 24)
    assert pooled.delta["layers"]["down_proj"].shape == (3, counts.max(), 16)
    # Trainable count: one [D] row of down_proj per selected channel.
    assert pooled.impl.num_params(pooled.delta, MODEL, pooled.config) == counts.sum() * 16
    _, heads = create("s2ft", jax.random.key(0), params, MODEL, attention_count=1,
                      attention_modules=["o_proj", "v_proj"], mlp_ratio=0.0, scope="layer")
    # A KV head with its 2 query heads: o rows 2 * 4 * 16, v columns 16 * 4, per layer.
    assert heads.impl.num_params(heads.delta, MODEL, heads.config) == 3 * (128 + 64)


def test_weight_selection_picks_the_largest_or_smallest_unit_norms(params):
    _, adapter = create("s2ft", jax.random.key(0), params, MODEL, mlp_count=5, scope="layer",
                        mlp_modules=["gate_proj", "down_proj"], selection="weight")
    _, small = create("s2ft", jax.random.key(0), params, MODEL, mlp_count=5, scope="layer",
                      mlp_modules=["gate_proj", "down_proj"], selection="weight", largest=False)
    for layer in range(MODEL.num_layers):
        gate = np.asarray(params["layers"]["gate_proj"][layer])  # [D, F]
        down = np.asarray(params["layers"]["down_proj"][layer])  # [F, D]
        norms = np.sqrt((gate**2).sum(0) + (down**2).sum(1))
        order = np.argsort(norms)
        assert set(_units(adapter, "mlp")[layer]) == set(order[-5:])
        assert set(_units(small, "mlp")[layer]) == set(order[:5])


def _batches(seed=0):
    rng = np.random.default_rng(seed)
    return [{"tokens": rng.integers(0, VOCAB, size=(2, 9))} for _ in range(2)]


def test_activation_selection_matches_hf_hooks(llama):
    hf_model, model, base = llama
    batches = _batches()
    sums = {}

    def hook(name, layer):
        def save(module, inputs, output):
            x = inputs[0].detach().abs().sum(dim=(0, 1)).numpy()
            sums[name, layer] = sums.get((name, layer), 0) + x
        return save

    handles = []
    for i, block in enumerate(hf_model.model.layers):
        handles.append(block.mlp.down_proj.register_forward_hook(hook("down", i)))
        handles.append(block.self_attn.o_proj.register_forward_hook(hook("o", i)))
    with torch.no_grad():
        for batch in batches:
            hf_model(torch.as_tensor(batch["tokens"]))
    for handle in handles:
        handle.remove()
    _, adapter = create("s2ft", jax.random.key(0), base, model, batches, mlp_count=4,
                        attention_count=1, attention_modules=["o_proj"], scope="layer",
                        selection="activation")
    for layer in range(model.num_layers):
        top = np.argsort(sums["down", layer])[-4:]
        assert set(_units(adapter, "mlp")[layer]) == set(top)
        per_group = sums["o", layer].reshape(model.num_kv_heads, -1).sum(-1)
        assert _units(adapter, "attention")[layer].tolist() == [int(np.argmax(per_group))]


def test_gradient_selection_matches_torch_autograd(llama):
    hf_model, model, base = llama
    batches = _batches(1)
    hf_model.zero_grad()
    for batch in batches:
        tokens = torch.as_tensor(batch["tokens"])
        (hf_model(tokens, labels=tokens).loss / len(batches)).backward()
    _, adapter = create("s2ft", jax.random.key(0), base, model, batches, mlp_ratio=0.1,
                        mlp_modules=["up_proj", "down_proj"], selection="gradient")
    scores = []
    for block in hf_model.model.layers:
        up = block.mlp.up_proj.weight.grad.numpy()  # [F, D]
        down = block.mlp.down_proj.weight.grad.numpy()  # [D, F]
        scores.append(np.sqrt((up**2).sum(1) + (down**2).sum(0)))
    hf_model.zero_grad()
    scores = np.stack(scores)
    total = round(0.1 * scores.size)
    want = np.zeros(scores.size, bool)
    want[np.argsort(scores.reshape(-1))[-total:]] = True
    got = np.zeros_like(scores, bool)
    for layer, ids in enumerate(_units(adapter, "mlp")):
        got[layer, ids] = True
    np.testing.assert_array_equal(got.reshape(-1), want)


def test_data_driven_selection_needs_calibration_batches(params):
    with pytest.raises(JftError, match="calibration_batches"):
        create("s2ft", jax.random.key(0), params, MODEL, selection="activation")


@pytest.mark.parametrize("options, match", [
    (dict(mlp_modules=["q_proj"]), "mlp_modules"),
    (dict(attention_ratio=1.5), "attention_ratio"),
    (dict(scope="row"), "scope"),
    (dict(selection="entropy"), "selection"),
    (dict(mlp_ratio=0.0), "selects nothing"),
    (dict(mlp_count=100, scope="layer"), "pool of 24"),
])
def test_bad_options_are_named(params, options, match):
    with pytest.raises(JftError, match=match):
        create("s2ft", jax.random.key(0), params, MODEL, **options)


def _batch(tokens):
    ones = np.ones_like(tokens)
    return {"tokens": jnp.asarray(tokens, jnp.int32), "segment_ids": jnp.asarray(ones, jnp.int32),
            "positions": jnp.asarray(np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape),
                                     jnp.int32),
            "loss_mask": jnp.asarray(ones, bool)}


def test_gradient_accumulation_equals_one_big_batch(params):
    base, adapter = create("s2ft", jax.random.key(0), params, MODEL, attention_ratio=0.5,
                           mlp_ratio=0.25, **ALL)
    tokens = np.random.default_rng(2).integers(0, 32, size=(4, 7))
    results = []
    for accumulate in (1, 2):
        optimizer = wrap_accumulation(masked_optimizer(optax.sgd(0.5), [adapter]), accumulate)
        steps = one_device_steps(MODEL, optimizer, base, [adapter])
        state = steps.initial_state
        for part in np.split(tokens, accumulate):
            state, _ = steps.train(state, base, _batch(part))
        results.append(state.adapters[0].delta["layers"])
    for module in s2ft.ATTENTION + s2ft.MLP:
        assert np.abs(results[0][module]).sum() > 0
        np.testing.assert_allclose(results[1][module], results[0][module], atol=1e-6)
