"""The PEFT core: gradients only for deltas, optax phase masks, named adapters, per-row ids."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jft.errors import JftError
from jft.models import ModelConfig, RopeConfig, RuntimePolicy, forward, init_params
from jft.peft import Adapter, get_method
from jft.peft.lora import LORA, LoraConfig
from jft.peft.named import AdapterSet, forward_per_row
from jft.peft.optim import labels, masked_optimizer

MODEL = ModelConfig(
    family="llama", vocab_size=64, embed_dim=256, num_layers=4, num_heads=4, num_kv_heads=2,
    head_dim=64, mlp_dim=1024, norm_eps=1e-6, rope=RopeConfig(), layer_types=("full",) * 4,
    policy=RuntimePolicy(dtype="float32"),
)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(3, 8)))


@pytest.fixture(scope="module")
def params():
    return init_params(MODEL, jax.random.key(0), std=0.1)


def _lora(params, seed, dora=False, targets=("q_proj", "v_proj", "down_proj")):
    config = LoraConfig(r=4, alpha=8, targets=targets, dora=dora)
    delta = LORA.init(jax.random.key(seed), params, MODEL, config)
    delta = jax.tree.map(
        lambda x: x + 0.2 * jax.random.normal(jax.random.key(seed + 100), x.shape), delta
    )
    return Adapter(delta, "lora", config)


def _loss(adapters, params, tokens):
    logits = forward(MODEL, params, tokens[:, :-1], adapters=adapters)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))


def _nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_gradients_exist_only_for_the_deltas(params):
    adapters = [_lora(params, 1)]
    grads = jax.grad(_loss)(adapters, params, TOKENS)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))


def test_compiled_step_allocates_no_base_sized_gradient(params):
    """The compiled LoRA step outputs delta-sized gradients and its scratch stays far below
    the base's size (it holds one scanned layer's weights, not a gradient buffer); the same
    step over the full params (full fine-tuning) outputs base-sized gradients."""
    adapters = [_lora(params, 1)]
    lora_step = jax.jit(jax.value_and_grad(_loss)).lower(adapters, params, TOKENS).compile()
    full_step = jax.jit(jax.value_and_grad(lambda p, t: _loss([], p, t))).lower(
        params, TOKENS).compile()
    lora_memory, full_memory = lora_step.memory_analysis(), full_step.memory_analysis()
    base_bytes = _nbytes(params)
    assert lora_memory.output_size_in_bytes <= _nbytes(adapters) + 1024
    assert lora_memory.temp_size_in_bytes < 0.5 * base_bytes
    assert full_memory.output_size_in_bytes >= base_bytes


def test_phase_mask_updates_only_the_selected_leaves(params):
    adapters = [_lora(params, 1)]
    names = jax.tree.leaves(labels(adapters))
    assert "lora/q_proj/a" in names and "lora/down_proj/b" in names
    only_b = masked_optimizer(optax.sgd(0.1), adapters, train=lambda label: label.endswith("/b"))
    grads = jax.grad(_loss)(adapters, params, TOKENS)
    updates, _ = only_b.update(grads, only_b.init(adapters), adapters)
    for label, update in zip(names, jax.tree.leaves(updates), strict=True):
        assert (float(jnp.abs(update).sum()) > 0) == label.endswith("/b"), label


def test_named_adapters_add_select_disable_delete(params):
    first, second = _lora(params, 1), _lora(params, 2)
    adapters = AdapterSet()
    adapters.add("first", first)
    adapters.add("second", [second], select=True)
    assert adapters.names == ["first", "second"] and adapters.active() == (second,)
    adapters.select("first")
    assert adapters.active() == (first,)
    adapters.disable()
    assert adapters.active() == ()
    adapters.delete("first")
    assert adapters.names == ["second"]
    with pytest.raises(JftError, match="no adapter named 'first'; adapters: second"):
        adapters.select("first")


@pytest.mark.parametrize("dora", [False, True])
def test_rows_with_different_adapter_ids_match_separate_forwards(params, dora):
    bank = [[_lora(params, 1, dora)], [_lora(params, 2, dora)]]
    ids = jnp.asarray([1, -1, 0])
    mixed = jax.jit(forward_per_row, static_argnums=0)(MODEL, params, TOKENS, ids, bank)
    expected = [
        forward(MODEL, params, TOKENS[:1], adapters=bank[1])[0],
        forward(MODEL, params, TOKENS[1:2])[0],
        forward(MODEL, params, TOKENS[2:], adapters=bank[0])[0],
    ]
    np.testing.assert_allclose(np.asarray(mixed), np.stack(expected), atol=1e-4, rtol=0)


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(JftError, match="unknown PEFT method 'lokr'; valid: .*lora"):
        get_method("lokr")


def test_create_builds_adapters_from_plain_options_and_rejects_unknown_ones(params):
    from jft.peft import create

    base, adapter = create("lora", jax.random.key(0), params, MODEL, r=2, alpha=4,
                           targets=["o_proj"], layers_to_transform=[1, 3])
    assert base is params  # the default init leaves the base alone
    assert set(adapter.delta["layers"]) == {"o_proj"}
    assert adapter.config.targets.layers == (1, 3)
    assert LORA.num_params(adapter.delta, MODEL, adapter.config) == 2 * 2 * (256 + 256)
    with pytest.raises(JftError, match="unknown option 'rank' for method 'lora'; valid: alpha"):
        create("lora", jax.random.key(0), params, MODEL, rank=4)
    with pytest.raises(JftError, match="layers_to_transform has \\[7\\]"):
        create("lora", jax.random.key(0), params, MODEL, layers_to_transform=[7])


def test_lora_on_attention_stacked_with_bitfit_merges_to_the_same_model(params):
    from jft.peft import create

    lora = _lora(params, 3, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    _, bitfit = create("bitfit", jax.random.key(0), params, MODEL)
    bitfit = Adapter(jax.tree.map(lambda x: x + 0.1, bitfit.delta), "bitfit", bitfit.config)
    stacked = forward(MODEL, params, TOKENS, adapters=[lora, bitfit])
    only_lora = forward(MODEL, params, TOKENS, adapters=[lora])
    assert not np.allclose(np.asarray(stacked), np.asarray(only_lora), atol=1e-3)
    merged = params
    for adapter in (lora, bitfit):
        merged = adapter.impl.merge(merged, adapter.delta, MODEL, adapter.config)
    np.testing.assert_allclose(np.asarray(forward(MODEL, merged, TOKENS)), np.asarray(stacked),
                               atol=1e-4, rtol=0)
    counts = {a.method: a.impl.num_params(a.delta, MODEL, a.config) for a in (lora, bitfit)}
    # 4 layers, rank 4: q and o are 256 -> 256, k and v 256 -> 128.
    assert counts == {"lora": 4 * 4 * (2 * (256 + 256) + 2 * (256 + 128)),
                      "bitfit": 4 * (256 * 3 + 128 * 2 + 1024 * 2)}


def test_every_registered_method_implements_the_method_protocol():
    from jft.peft import REGISTRY
    from jft.peft.base import Method

    assert len(REGISTRY) >= 12
    for name, method in REGISTRY.items():
        assert isinstance(method, Method), name
