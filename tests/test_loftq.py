"""LoftQ (`init: loftq`): the quantized weight Q and LoRA factors A, B chosen together so
that dequantize(Q) + s A B ~ W. Checked on tiny random matrices against a NumPy
reference of the paper's algorithm, for its defining properties (the error falls with
each step and is below plain QLoRA's; at full rank it vanishes), and on a tiny model for
the layouts a quantized base and a LoRA delta use."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jft.errors import JftError
from jft.models import ModelConfig, RopeConfig, RuntimePolicy, forward, param_shapes
from jft.models.sites import linear_site
from jft.peft import Adapter, create, lora_inits
from jft.peft.lora import LORA, LoraConfig, plan
from jft.quant.loftq import loftq, loftq_weight
from jft.quant.params import QuantizeSpec, dequantize_params, matrix_to_weight, weight_to_matrix
from jft.quant.tensor import QuantizedTensor, is_quantized
from jft.quant.tensor import dequantize as _dequantize

NF4 = QuantizeSpec("nf4", 64, double_quant=True)
SPECS = {"nf4": NF4, "fp4": QuantizeSpec("fp4", 32, double_quant=False),
         "int8": QuantizeSpec("int8", 64)}
MODEL = ModelConfig(
    family="llama", vocab_size=48, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16, mlp_dim=128, norm_eps=1e-6, rope=RopeConfig(), layer_types=("full", "full"),
    policy=RuntimePolicy(dtype="float32"),
)


# Jitted: eager dequantization compiles each of its ops for each new shape.
dequantize = jax.jit(_dequantize)
dequantize_all = jax.jit(dequantize_params, static_argnums=1)


def _dequantized_weight(site, quantized):
    """A stacked site weight in its stored layout, from its quantized matrix."""
    return np.asarray(matrix_to_weight(site, dequantize(quantized), site.dims(MODEL)[0], lead=1))


def _lora_shapes(weights, config):
    """The delta of LoRA's default init, as shapes (nothing computed)."""
    return jax.eval_shape(lambda: LORA.init(jax.random.key(1), weights, MODEL, config))


def _matrix(seed, shape=(64, 128), std=0.02):
    return (np.random.default_rng(seed).standard_normal(shape) * std).astype(np.float32)


def _error(w, quantized, a, b, scaling):
    """||W - (dequantize(Q) + s (A B)^T)||_F of one [out, in] matrix, in float64."""
    d = np.asarray(dequantize(quantized), np.float64).reshape(w.shape)
    low = scaling * (a.astype(np.float64) @ b.astype(np.float64).reshape(a.shape[-1], -1)).T
    return float(np.linalg.norm(w.astype(np.float64) - d - low.reshape(w.shape)))


def _plain_error(w, spec):
    return float(np.linalg.norm(w - np.asarray(dequantize(spec.quantize(w)))))


def _reference(w, spec, rank, iterations):
    """The paper's / PEFT's `loftq_init`, in NumPy with float64 SVDs: (D, lora_A [r, in],
    lora_B [out, r]) in PEFT's layout, unscaled (W ~ D + lora_B lora_A)."""
    residual_target = w
    for _ in range(iterations):
        d = np.asarray(dequantize(spec.quantize(residual_target)), np.float64)
        u, s, vt = np.linalg.svd(w.astype(np.float64) - d, full_matrices=False)
        lora_b = u[:, :rank] * np.sqrt(s[:rank])
        lora_a = np.sqrt(s[:rank])[:, None] * vt[:rank]
        residual_target = (w - lora_b @ lora_a).astype(np.float32)
    return d, lora_a, lora_b


def _same_quantized(x: QuantizedTensor, y: QuantizedTensor) -> bool:
    leaves_x, tree_x = jax.tree.flatten(x)
    leaves_y, tree_y = jax.tree.flatten(y)
    return tree_x == tree_y and all(np.array_equal(np.asarray(p), np.asarray(q))
                                    for p, q in zip(leaves_x, leaves_y, strict=True))


# ---------------------------------------------------------------- the algorithm


@pytest.mark.parametrize("name", SPECS)
def test_error_falls_with_each_iteration(name):
    spec, w, scaling = SPECS[name], _matrix(0), 2.0
    finals = []
    for iterations in (1, 2, 3, 5):
        result = loftq(w, spec, 4, scaling, iterations)
        assert result.errors.shape == (iterations,)
        # The reported error is the model's at init, measured independently.
        assert result.errors[-1] == pytest.approx(
            _error(w, result.quantized, result.a, result.b, scaling), rel=1e-5)
        finals.append(result.errors[-1])
        longest = result.errors
    assert np.all(np.diff(finals) < 0), finals
    assert np.all(np.diff(longest) < 0), longest
    # A shorter run is the longer one stopped early.
    assert finals == pytest.approx(list(longest[[0, 1, 2, 4]]), rel=1e-6)


@pytest.mark.parametrize("name", SPECS)
def test_beats_plain_qlora(name):
    spec, w = SPECS[name], _matrix(1, (96, 64))
    plain = _plain_error(w, spec)  # QLoRA: B = 0, the model is dequantize(quantize(W))
    one = loftq(w, spec, 8, 0.5, 1)
    assert one.errors[-1] < 0.95 * plain
    # One step keeps plain quantization's Q bit for bit; more steps change it.
    assert _same_quantized(one.quantized, spec.quantize(w))
    three = loftq(w, spec, 8, 0.5, 3)
    assert three.errors[-1] < one.errors[-1]
    assert not _same_quantized(three.quantized, spec.quantize(w))


@pytest.mark.parametrize("shape", [(64, 128), (128, 64)])
def test_full_rank_is_exact(shape):
    w = _matrix(2, shape)
    result = loftq(w, NF4, min(shape), 0.25, 1)
    assert result.errors[0] < 1e-5 * np.linalg.norm(w)
    assert result.errors[0] < 1e-4 * _plain_error(w, NF4)


@pytest.mark.parametrize("iterations", [1, 3])
def test_matches_the_reference(iterations):
    """Q, and the factors: ours are PEFT's transposed and divided by sqrt(s) each, so the
    model at init D + s A B equals PEFT's D + lora_B lora_A whatever s is."""
    w, rank, scaling = _matrix(3), 6, 4.0
    d, lora_a, lora_b = _reference(w, NF4, rank, iterations)
    result = loftq(w, NF4, rank, scaling, iterations)
    np.testing.assert_allclose(np.asarray(dequantize(result.quantized)), d, atol=1e-6)
    np.testing.assert_allclose(scaling * result.a @ result.b, (lora_b @ lora_a).T, atol=1e-5)
    # Each rank-one component, up to the SVD's sign: A = lora_A^T / sqrt(s).
    for k in range(rank):
        sign = np.sign(result.a[:, k] @ lora_a[k])
        np.testing.assert_allclose(sign * result.a[:, k], lora_a[k] / math.sqrt(scaling),
                                   atol=1e-5)
        np.testing.assert_allclose(sign * result.b[k], lora_b[:, k] / math.sqrt(scaling),
                                   atol=1e-5)


def test_stacked_entries_are_independent():
    """A stacked weight [L, *out, in]: each layer at its own rank and scale (rank 0:
    plain quantization, zero factors), factors padded to the widest, Q double-quantized
    per layer: the same as LoftQ of each layer alone, stacked (as the loader stacks)."""
    stacked = np.stack([_matrix(10 + i, (4, 16, 64)) for i in range(3)])  # out dims (4, 16)
    ranks, scales = (4, 0, 2), (2.0, 0.0, 0.5)
    result = loftq(stacked, NF4, ranks, scales, 2, lead=1)
    assert result.a.shape == (3, 64, 4) and result.b.shape == (3, 4, 4, 16)
    assert result.errors.shape == (3, 2)
    layers = [loftq(stacked[i], NF4, ranks[i], scales[i], 2, lead=0, width=4)
              for i in range(3)]
    assert _same_quantized(result.quantized,
                           jax.tree.map(lambda *xs: np.stack(xs), *[x.quantized for x in layers]))
    for i, layer in enumerate(layers):
        np.testing.assert_allclose(result.a[i], layer.a, atol=1e-6)
        np.testing.assert_allclose(result.b[i], layer.b, atol=1e-6)
        np.testing.assert_allclose(result.errors[i], layer.errors, rtol=1e-6)
    assert not result.a[1].any() and not result.b[1].any()
    assert result.errors[1, -1] == pytest.approx(_plain_error(stacked[1].reshape(64, 64), NF4),
                                                 rel=1e-6)
    assert not result.a[2][:, 2:].any() and not result.b[2][2:].any()  # beyond rank 2


def test_bad_arguments():
    w = _matrix(4, (32, 64))
    with pytest.raises(ValueError, match="ranks"):
        loftq(w, NF4, 33, 1.0)
    with pytest.raises(ValueError, match="iteration"):
        loftq(w, NF4, 4, 1.0, 0)
    with pytest.raises(ValueError, match="scaling"):
        loftq(w, NF4, 4, 0.0)


# ---------------------------------------------------------------- sites and the delta


@pytest.fixture(scope="module")
def weights():
    """Random params (NumPy: quicker than `init_params` for a test this small)."""
    rng = np.random.default_rng(0)

    def leaf(path, shape):
        if path[-1].key.endswith("norm"):
            return jnp.ones(shape)
        return jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 0.02)

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(MODEL),
                                            is_leaf=lambda x: isinstance(x, tuple))


@pytest.mark.parametrize("module", ["q_proj", "o_proj", "down_proj"])
def test_site_layout(weights, module):
    """q_proj [D, N, H] (out dims N, H) and o_proj [N, H, D] (in dims N, H): Q in the
    quantized base's layout, A and B in LoRA's delta layout, and the model's weight at
    init, dequantize(Q) + s A B in the site's layout, close to W."""
    site = linear_site(MODEL, module)
    config = LoraConfig(r=4, alpha=8, targets=(module,))
    p = plan(MODEL, config)[module]
    weight = np.asarray(weights["layers"][module])
    result = loftq_weight(site, weight, NF4, p.ranks, p.scales, 2, width=p.max_rank)
    default = _lora_shapes(weights, config)["layers"][module]
    assert result.a.shape == default["a"].shape  # [L, *in, r]
    assert result.b.shape == default["b"].shape  # [L, r, *out]
    plain = NF4.quantize(weight_to_matrix(site, weight, lead=1), group_ndim=1)
    assert jax.tree.map(np.shape, result.quantized) == jax.tree.map(np.shape, plain)
    d = _dequantized_weight(site, result.quantized)
    w_in_out = site.to_in_out(weight, lead=1)
    model_weight = site.to_in_out(d, lead=1) + p.scales[0] * np.stack(
        [np.tensordot(result.a[i], result.b[i], axes=1) for i in range(MODEL.num_layers)])
    plain_d = site.to_in_out(_dequantized_weight(site, plain), lead=1)
    for i in range(MODEL.num_layers):
        error = np.linalg.norm(w_in_out[i] - model_weight[i])
        assert error == pytest.approx(result.errors[i, -1], rel=1e-4)
        assert error < 0.95 * np.linalg.norm(w_in_out[i] - plain_d[i])


LOFTQ = LoraConfig(r=4, alpha=16, targets=("q_proj", "o_proj", "down_proj"),
                   rank_pattern=(("model.layers.1.self_attn.o_proj", 2),),
                   init="loftq", init_options=(("loftq_iter", 2),))


@pytest.fixture(scope="module")
def loftq_base(weights):
    return lora_inits.loftq_params(weights, MODEL, LOFTQ, NF4)


def test_loftq_params(weights, loftq_base):
    base, delta = loftq_base
    plans = plan(MODEL, LOFTQ)
    for name, value in weights["layers"].items():
        if name not in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"):
            assert base["layers"][name] is value  # norms stay
            continue
        assert is_quantized(base["layers"][name])
        site = linear_site(MODEL, name)
        plain = NF4.quantize(weight_to_matrix(site, np.asarray(value), lead=1), group_ndim=1)
        # Untargeted sites are plainly quantized; targeted ones at 2 steps differ.
        assert _same_quantized(base["layers"][name], plain) == (name not in plans)
    assert base["embed"] is weights["embed"]  # embeddings: only with spec.embeddings
    default = _lora_shapes(weights, LoraConfig(r=4, targets=LOFTQ.targets,
                                               rank_pattern=LOFTQ.rank_pattern))["layers"]
    readable = dequantize_all(base, MODEL)
    for module, p in plans.items():
        entry = delta["layers"][module]
        assert sorted(entry) == ["a", "b", "init_a", "init_b"]
        assert entry["a"].shape == default[module]["a"].shape
        assert entry["b"].shape == default[module]["b"].shape
        np.testing.assert_array_equal(entry["init_a"], entry["a"])
        site = linear_site(MODEL, module)
        w = site.to_in_out(np.asarray(weights["layers"][module]), lead=1)
        d = site.to_in_out(np.asarray(readable["layers"][module]), lead=1)
        for layer, r in enumerate(p.ranks):
            assert not np.asarray(entry["a"])[layer, ..., r:].any()
            low = p.scales[layer] * np.tensordot(np.asarray(entry["a"][layer]),
                                                 np.asarray(entry["b"][layer]), axes=1)
            plain_d = np.asarray(dequantize(NF4.quantize(
                weight_to_matrix(site, np.asarray(weights["layers"][module][layer])))))
            plain_error = np.linalg.norm(weight_to_matrix(site, np.asarray(
                weights["layers"][module][layer])) - plain_d)
            assert np.linalg.norm(w[layer] - d[layer] - low) < 0.95 * plain_error
    # The adapter applies to the quantized base as it is; over the float base it was
    # made from, the base is W - s A0 B0 (as PiSSA's), so exports over W stay exact.
    assert LORA.rebase(base, delta, MODEL, LOFTQ) is base
    rebased = LORA.rebase(weights, delta, MODEL, LOFTQ)
    merged = LORA.merge(rebased, delta, MODEL, LOFTQ)
    np.testing.assert_allclose(merged["layers"]["q_proj"], weights["layers"]["q_proj"],
                               atol=1e-6)


def test_model_starts_near_the_float_one(weights, loftq_base):
    """The quantized model with its LoftQ adapter is closer to the float model than
    plain QLoRA's (the adapter's scaling is folded into the factors)."""
    base, delta = loftq_base
    targets = tuple(plan(MODEL, LOFTQ))
    # Only the targeted weights quantized, so the comparison is about them.
    loftq_layers = {name: base["layers"][name] if name in targets else value
                    for name, value in weights["layers"].items()}
    plain_layers = dict(weights["layers"])
    for name in targets:
        site = linear_site(MODEL, name)
        plain_layers[name] = NF4.quantize(
            weight_to_matrix(site, np.asarray(weights["layers"][name]), lead=1), group_ndim=1)
    tokens = np.random.default_rng(5).integers(0, MODEL.vocab_size, (2, 12))
    reference = forward(MODEL, weights, tokens)
    lora = forward(MODEL, dict(weights, layers=loftq_layers), tokens,
                   adapters=[Adapter(delta, "lora", LOFTQ)])
    plain = forward(MODEL, dict(weights, layers=plain_layers), tokens)
    # PEFT's factors are not divided by sqrt(s): with s = alpha / r = 4 (8 for layer 1's
    # rank-2 o_proj) they overshoot W by (s - 1) times the low-rank part.
    unscaled = {"layers": {}}
    for module, p in plan(MODEL, LOFTQ).items():
        entry = delta["layers"][module]
        root = np.sqrt(np.asarray(p.scales, np.float32))
        unscaled["layers"][module] = {
            "a": entry["a"] * root.reshape(-1, *[1] * (entry["a"].ndim - 1)),
            "b": entry["b"] * root.reshape(-1, *[1] * (entry["b"].ndim - 1))}
    peft = forward(MODEL, dict(weights, layers=loftq_layers), tokens,
                   adapters=[Adapter(unscaled, "lora", LOFTQ)])
    error = np.linalg.norm(lora - reference)
    # Random weights have a flat spectrum, so rank 4 of 64 removes only some of the error.
    assert error < 0.95 * np.linalg.norm(plain - reference)
    assert 2 * error < np.linalg.norm(peft - reference)


def test_dora_magnitude(weights):
    """Under DoRA the magnitude is the norm of the model's initial weight D + s A B per
    output, so DoRA's rescaling starts at 1."""
    config = LoraConfig(r=4, alpha=8, targets=("o_proj",), dora=True, init="loftq")
    base, delta = lora_inits.loftq_params(weights, MODEL, config, NF4)
    site = linear_site(MODEL, "o_proj")
    entry = delta["layers"]["o_proj"]
    d = site.to_in_out(np.asarray(dequantize_all(base, MODEL)["layers"]["o_proj"]), lead=1)
    s = plan(MODEL, config)["o_proj"].scales[0]
    initial = d + s * np.stack([np.tensordot(entry["a"][i], entry["b"][i], axes=1)
                                for i in range(MODEL.num_layers)])
    norm = np.sqrt(np.sum(initial**2, axis=(1, 2)))  # over the inputs (N, H)
    np.testing.assert_allclose(entry["magnitude"], norm, rtol=1e-5)


# ---------------------------------------------------------------- refusals and options


def test_needs_a_quantized_base(weights, loftq_base):
    with pytest.raises(JftError, match=r"init: loftq needs a quantized base \(quantize: "
                                       r"nf4\|fp4\|int8\)"):
        create("lora", jax.random.key(0), weights, MODEL, config=LOFTQ)
    with pytest.raises(JftError, match="needs a quantized base .* from its float weights"):
        LORA.init(jax.random.key(0), loftq_base[0], MODEL, LOFTQ)
    with pytest.raises(JftError, match="needs a quantized base"):
        create("lora", jax.random.key(0), loftq_base[0], MODEL, config=LOFTQ)
    with pytest.raises(JftError, match="needs a quantized base"):
        lora_inits.loftq_params(weights, MODEL, LOFTQ, None)
    with pytest.raises(JftError, match="already quantized"):
        lora_inits.loftq_params(loftq_base[0], MODEL, LOFTQ, NF4)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_loftq_iter_is_checked(value):
    config = LoraConfig(init="loftq", init_options={"loftq_iter": value})
    with pytest.raises(JftError, match="loftq_iter"):
        lora_inits.options(config)


def test_options():
    assert lora_inits.options(LoraConfig(init="loftq")) == {"loftq_iter": 1}
    with pytest.raises(JftError, match="valid: loftq_iter"):
        lora_inits.options(LoraConfig(init="loftq", init_options={"niter": 2}))
