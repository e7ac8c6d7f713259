"""`kernels: pallas` routes LoRA and S2FT through the fused kernels (interpret mode on CPU)
with the XLA path's losses and gradients; `auto` and meshes keep the XLA path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jft.models import ModelConfig, RopeConfig, RuntimePolicy, init_params
from jft.objectives.sft import mean_loss
from jft.pallas_kernels import use_pallas
from jft.peft import create
from jft.peft.base import combine, partition, use_kernel

MODEL = ModelConfig(
    family="llama", vocab_size=40, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=8, mlp_dim=48, norm_eps=1e-6, rope=RopeConfig(), layer_types=("full", "full"),
    policy=RuntimePolicy(dtype="float32"),
)
METHODS = {
    # [N, H] -> D, D -> [N, H] and D -> F layouts, a padded rank, rsLoRA's scale.
    "lora": {"r": 4, "alpha": 8, "rslora": True, "targets": ["q_proj", "o_proj", "up_proj"],
             "rank_pattern": {"o_proj": 2}},
    "s2ft": {"attention_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
             "attention_count": 1, "mlp_modules": ["gate_proj", "up_proj", "down_proj"],
             "mlp_ratio": 0.25, "scope": "layer"},
}


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, MODEL.vocab_size, (2, 11)).astype(np.int32)
    return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.ones((2, 11), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(11, dtype=jnp.int32), (2, 11)),
            "loss_mask": jnp.ones((2, 11), bool)}


@pytest.mark.parametrize("method", list(METHODS))
def test_pallas_kernels_give_the_xla_paths_loss_and_gradients(method):
    params = init_params(MODEL, jax.random.key(0), std=0.2)
    base, adapter = create(method, jax.random.key(1), params, MODEL, **METHODS[method])
    # Non-zero trainable deltas, so that every gradient path carries signal.
    trainable, frozen = partition([adapter])
    trainable = jax.tree.map(lambda x: x + 0.05 * jnp.cos(jnp.arange(x.size)).reshape(x.shape),
                             trainable)
    batch = _batch()

    def loss_and_grads(kernels):
        model = MODEL.replace(kernels=kernels)
        return jax.value_and_grad(
            lambda part: mean_loss(model, base, combine(part, frozen), batch)[0]
        )

    assert "pallas_call" in str(jax.make_jaxpr(loss_and_grads("pallas"))(trainable))
    assert "pallas_call" not in str(jax.make_jaxpr(loss_and_grads("xla"))(trainable))
    loss, grads = jax.jit(loss_and_grads("pallas"))(trainable)
    expected, expected_grads = jax.jit(loss_and_grads("xla"))(trainable)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_auto_keeps_xla_until_a_benchmark_says_otherwise_and_meshes_keep_xla():
    from types import SimpleNamespace

    from jft.sharding import MeshConfig, make_rules
    from jft.sharding.logical import use_rules

    # No platform has a measured win recorded yet (pallas_kernels.MEASURED_FASTER).
    assert not use_pallas("lora_linear", "auto")
    assert use_pallas("lora_linear", "pallas") and not use_pallas("lora_linear", "xla")
    with pytest.raises(ValueError, match="valid: auto, pallas, xla"):
        use_pallas("lora_linear", "fast")
    model = MODEL.replace(kernels="pallas")
    assert use_kernel("lora_linear", model)
    with use_rules(make_rules(MeshConfig(fsdp=1))):  # this process's one device
        assert use_kernel("lora_linear", model)
    # Over several devices the einsums are what the rules shard.
    with use_rules(SimpleNamespace(mesh=SimpleNamespace(size=8))):
        assert not use_kernel("lora_linear", model)
