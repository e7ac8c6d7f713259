"""LoRA factor merging (`cat`, `svd`) against HF PEFT's add_weighted_adapter on a tiny
Llama, and against jft's own LoRA merge."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import torch

from jft.errors import JftError
from jft.merging.lora_factors import (
    LoraFactors,
    cat,
    clamp_factors,
    delta_weight,
    module_loras,
    svd,
)
from jft.models import ModelConfig, RopeConfig, param_shapes
from jft.models.config import RuntimePolicy
from jft.peft import create
from jft.peft.lora import LORA, LoraConfig

LAYERS, MODULES, WEIGHTS = 2, ("q_proj", "v_proj"), (0.7, -1.3)


@pytest.fixture(scope="module")
def peft_model():
    """A tiny Llama with adapters a1 (r 4, alpha 8) and a2 (r 6, alpha 3) on q_proj and
    v_proj, B random so that ΔW != 0, and PEFT's merges of them."""
    import transformers
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config)
    model = get_peft_model(model, PeftLoraConfig(r=4, lora_alpha=8, target_modules=list(MODULES)),
                           adapter_name="a1")
    model.add_adapter("a2", PeftLoraConfig(r=6, lora_alpha=3, target_modules=list(MODULES)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    model.add_weighted_adapter(["a1", "a2"], list(WEIGHTS), "cat", combination_type="cat")
    for rank in (5, 10, 12):
        model.add_weighted_adapter(["a1", "a2"], list(WEIGHTS), f"svd{rank}",
                                   combination_type="svd", svd_rank=rank)
    model.add_weighted_adapter(["a1", "a2"], list(WEIGHTS), "clamped",
                               combination_type="svd", svd_rank=5, svd_clamp=0.8)
    return model


def _layer(model, module, index):
    return model.base_model.model.model.layers[index].self_attn.get_submodule(module)


def _jft_lora(model, module, adapter):
    """PEFT's factors of one adapter as jft's (entry, scales): a = A.T, b = B.T."""
    a, b, scales = [], [], []
    for index in range(LAYERS):
        layer = _layer(model, module, index)
        a.append(layer.lora_A[adapter].weight.detach().numpy().T)  # [in, r]
        b.append(layer.lora_B[adapter].weight.detach().numpy().T)  # [r, out]
        scales.append(layer.scaling[adapter])
    return {"a": np.stack(a), "b": np.stack(b)}, np.asarray(scales)


def _peft_delta(model, module, adapter):
    """PEFT's own ΔW = scaling · B A, transposed to jft's [in, out], per layer."""
    return np.stack([_layer(model, module, i).get_delta_weight(adapter).detach().numpy().T
                     for i in range(LAYERS)])


def _inputs(model, module):
    return [_jft_lora(model, module, "a1"), _jft_lora(model, module, "a2")]


def _merged_delta(factors: LoraFactors):
    assert factors.alpha == factors.r  # scale 1
    return delta_weight({"a": factors.a, "b": factors.b}, np.ones(factors.a.shape[0]))


def _weighted_sum(loras):
    return sum(w * delta_weight(entry, scales) for (entry, scales), w in zip(loras, WEIGHTS,
                                                                          strict=True))


@pytest.mark.parametrize("module", MODULES)
def test_cat_factors_equal_peft_and_sum_the_weighted_deltas(peft_model, module):
    loras = _inputs(peft_model, module)
    merged = cat(loras, WEIGHTS)
    peft_entry, peft_scales = _jft_lora(peft_model, module, "cat")
    assert merged.r == 10 and merged.a.shape[-1] == 10 and merged.a.dtype == np.float32
    np.testing.assert_array_equal(merged.a, peft_entry["a"])
    np.testing.assert_array_equal(merged.b, peft_entry["b"])
    np.testing.assert_array_equal(peft_scales, 1.0)
    np.testing.assert_allclose(_merged_delta(merged), _weighted_sum(loras), rtol=0, atol=1e-6)
    np.testing.assert_allclose(_merged_delta(merged), _peft_delta(peft_model, module, "cat"),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("rank", [5, 10, 12])
def test_svd_gives_pefts_delta(peft_model, module, rank):
    loras = _inputs(peft_model, module)
    merged = svd(loras, WEIGHTS, rank)
    assert merged.a.shape == (LAYERS, 32, rank) and merged.r == rank
    np.testing.assert_allclose(_merged_delta(merged), _peft_delta(peft_model, module,
                                                                  f"svd{rank}"),
                               rtol=0, atol=1e-5)
    if rank >= 10:  # the full rank of Σ w ΔW: exact
        np.testing.assert_allclose(_merged_delta(merged), _weighted_sum(loras), atol=1e-5)
    for layer in range(LAYERS):  # a: orthonormal columns (PEFT's Vh rows); S sits in b
        a = merged.a[layer].astype(np.float64)
        np.testing.assert_allclose(a.T @ a, np.eye(rank), atol=1e-5)
        norms = np.linalg.norm(merged.b[layer], axis=1)
        assert np.all(np.diff(norms) <= 1e-5)  # singular values, descending


@pytest.mark.parametrize("module", MODULES)
def test_clamp_is_pefts_quantile_clamp(peft_model, module):
    # PEFT's clamp of PEFT's own unclamped SVD factors gives PEFT's clamped factors
    # (our SVD's signs may differ from LAPACK's, and the quantile sees the signs).
    unclamped, _ = _jft_lora(peft_model, module, "svd5")
    clamped, _ = _jft_lora(peft_model, module, "clamped")
    for layer in range(LAYERS):
        a, b = clamp_factors(unclamped["a"][layer], unclamped["b"][layer], 0.8)
        np.testing.assert_allclose(a, clamped["a"][layer], rtol=0, atol=1e-6)
        np.testing.assert_allclose(b, clamped["b"][layer], rtol=0, atol=1e-6)
    # and svd(clamp=q) is that clamp applied to svd()'s factors, layer by layer
    loras = _inputs(peft_model, module)
    plain, with_clamp = svd(loras, WEIGHTS, 5), svd(loras, WEIGHTS, 5, clamp=0.8)
    for layer in range(LAYERS):
        a, b = clamp_factors(plain.a[layer], plain.b[layer], 0.8)
        np.testing.assert_allclose(with_clamp.a[layer], a, atol=1e-7)
        np.testing.assert_allclose(with_clamp.b[layer], b, atol=1e-7)


def test_multi_axis_layout_merges_like_the_flat_one(peft_model):
    # v_proj's output [16] as [heads 2, head_dim 8], its input [32] as [4, 8]
    loras = _inputs(peft_model, "v_proj")
    shaped = [({"a": e["a"].reshape(LAYERS, 4, 8, -1), "b": e["b"].reshape(LAYERS, -1, 2, 8)},
               s) for e, s in loras]
    for merge in (lambda x: cat(x, WEIGHTS), lambda x: svd(x, WEIGHTS, 5, clamp=0.9)):
        flat, multi = merge(loras), merge(shaped)
        assert multi.a.shape[1:3] == (4, 8) and multi.b.shape[2:] == (2, 8)
        np.testing.assert_allclose(multi.a.reshape(flat.a.shape), flat.a, atol=1e-6)
        np.testing.assert_allclose(multi.b.reshape(flat.b.shape), flat.b, atol=1e-6)


def test_rslora_output_alpha_keeps_scale_one(peft_model):
    loras = _inputs(peft_model, "q_proj")
    assert cat(loras, WEIGHTS, rslora=True).alpha == pytest.approx(math.sqrt(10))
    assert svd(loras, WEIGHTS, 5, rslora=True).alpha == pytest.approx(math.sqrt(5))


def test_bad_inputs_name_the_field(peft_model):
    loras = _inputs(peft_model, "v_proj")
    with pytest.raises(JftError, match="weights"):
        cat(loras, [1.0])
    with pytest.raises(JftError, match="rank"):
        svd(loras, WEIGHTS, 17)  # v_proj is 32 -> 16
    with pytest.raises(JftError, match="clamp"):
        svd(loras, WEIGHTS, 4, clamp=1.5)
    with pytest.raises(JftError, match=r"loras\[1\]"):
        cat([loras[0], _inputs(peft_model, "q_proj")[1]], WEIGHTS)
    with pytest.raises(JftError, match="scales"):
        cat([loras[0], (loras[1][0], np.ones(3))], WEIGHTS)
    with pytest.raises(JftError, match="loras"):
        cat([], [])


MODEL = ModelConfig(
    family="llama", vocab_size=40, embed_dim=16, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=4, mlp_dim=24, norm_eps=1e-6, rope=RopeConfig(), layer_types=("full", "full"),
    policy=RuntimePolicy(dtype="float32"),
)


def _noisy(rng):
    """Noise on every leaf: b != 0, and the padded entries of a non-zero too."""
    return lambda x: np.asarray(x) + 0.1 * rng.normal(size=x.shape).astype(np.float32)


def test_cat_of_jft_deltas_merges_like_their_sum():
    """module_loras reads a jft delta (rank_pattern padding masked out); the cat merge,
    as a LoraConfig(r, alpha) adapter, merges into the base as Σ w_t (merge_t − base)."""
    rng = np.random.default_rng(0)
    shapes = param_shapes(MODEL)["layers"]  # only the targeted weights: init_params is slow
    base = {"layers": {m: rng.normal(size=shapes[m]).astype(np.float32)
                       for m in ("q_proj", "down_proj")}}
    adapters = []
    for seed, options in enumerate([
        dict(r=2, alpha=5.0, targets=["q_proj", "down_proj"]),
        dict(r=4, alpha=3.0, targets=["q_proj", "down_proj"], rslora=True,
             rank_pattern={"model.layers.0.self_attn.q_proj": 1}),
    ]):
        _, adapter = create("lora", jax.random.key(seed + 1), base, MODEL, **options)
        delta = jax.tree.map(_noisy(np.random.default_rng(seed)), adapter.delta)
        adapters.append((delta, adapter.config))
    weights = (0.5, 2.0)
    expected = {}
    for (delta, config), w in zip(adapters, weights, strict=True):
        merged = LORA.merge(base, delta, MODEL, config)
        for module in ("q_proj", "down_proj"):
            diff = np.asarray(merged["layers"][module], np.float64) - np.asarray(
                base["layers"][module], np.float64)
            expected[module] = expected.get(module, 0) + w * diff
    loras = [module_loras(delta, MODEL, config) for delta, config in adapters]
    layers, ranks = {}, set()
    for module in ("q_proj", "down_proj"):
        factors = cat([per_adapter[module] for per_adapter in loras], weights)
        layers[module] = {"a": factors.a, "b": factors.b}
        ranks.add((factors.r, factors.alpha))
    ((r, alpha),) = ranks
    assert r == 6
    config = LoraConfig(r=r, alpha=alpha, targets=["q_proj", "down_proj"])
    merged = LORA.merge(base, {"layers": layers}, MODEL, config)
    for module in ("q_proj", "down_proj"):
        got = np.asarray(merged["layers"][module], np.float64) - np.asarray(
            base["layers"][module], np.float64)
        np.testing.assert_allclose(got, expected[module], rtol=0, atol=2e-6)
