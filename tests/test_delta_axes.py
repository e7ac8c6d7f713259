"""Every method's delta names its logical axes so a mesh shards it like its base: valid
trees for every registered method, hand-written expectations, and training on 8 devices
that equals training on one."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

from jft.models import PARAM_AXES, ModelConfig, RopeConfig, RuntimePolicy
from jft.peft import create
from jft.peft.base import REGISTRY
from jft.sharding import AXIS_NAMES
from tests.hf_reference import random_params

# Every kind of layer leaf (biases, q/k norms, post norms) and an untied head, so parked,
# full and norm-tuning deltas meet all of PARAM_AXES.
MODEL = ModelConfig(
    family="qwen3", vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=8, mlp_dim=48, norm_eps=1e-6, rope=RopeConfig(), layer_types=("full", "full"),
    qkv_bias=True, o_bias=True, mlp_bias=True, qk_norm=True, post_norms=True,
    policy=RuntimePolicy(dtype="float32"),
)
CASES = {
    "lora": ("lora", {}),
    "lora_dora_all_linear": ("lora", dict(dora=True, targets="all-linear", r=4)),
    "lora_pissa": ("lora", dict(init="pissa", r=4)),  # records init_a / init_b
    "full": ("full", {}),
    "full_some": ("full", dict(params=["embed", "q_proj", "mlp_norm"])),
    "ia3": ("ia3", {}),
    "ia3_all_linear": ("ia3", dict(targets="all-linear", feedforward=["o_proj", "down_proj"])),
    "bitfit": ("bitfit", {}),
    "norm_tuning_all": ("norm_tuning", dict(norms="all")),
    "ssf": ("ssf", {}),
    "prompt_tuning": ("prompt_tuning", dict(num_virtual_tokens=3)),
    "prefix_tuning": ("prefix_tuning", dict(num_virtual_tokens=3)),
    "prefix_tuning_projection": ("prefix_tuning", dict(num_virtual_tokens=3, projection=True,
                                                       encoder_hidden_size=8)),
    "s2ft": ("s2ft", dict(attention_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          mlp_modules=["gate_proj", "up_proj", "down_proj"],
                          attention_ratio=0.5, mlp_ratio=0.25)),
    "spiel": ("spiel", dict(count=8)),
    "lisa": ("lisa", dict(activated_layers=1)),
    "hft": ("hft", {}),
    "osf": ("osf", dict(preserved_rank=0.5)),
    "sparse_delta": ("sparse_delta", dict(count=8)),
    "mixlora": ("mixlora", {}),
    "mola": ("mola", dict(experts_per_layer=[2, 4])),
}


def _is_axes(x) -> bool:
    return isinstance(x, tuple)


@pytest.fixture(scope="module")
def adapters():
    params = random_params(MODEL)
    return {case: create(method, jax.random.key(1), params, MODEL, **options)[1]
            for case, (method, options) in CASES.items()}


def _axes(adapter):
    return adapter.impl.delta_axes(adapter.delta, MODEL, adapter.config)


def test_the_cases_cover_every_registered_method():
    assert {method for method, _ in CASES.values()} == set(REGISTRY)


@pytest.mark.parametrize("case", list(CASES))
def test_axes_are_shaped_like_the_delta_with_one_valid_name_per_dimension(adapters, case):
    adapter = adapters[case]
    axes, axes_def = jax.tree.flatten(_axes(adapter), is_leaf=_is_axes)
    leaves, delta_def = jax.tree.flatten_with_path(adapter.delta)
    assert axes_def == delta_def
    for (path, leaf), names in zip(leaves, axes, strict=True):
        where = (case, jax.tree_util.keystr(path))
        assert len(names) == leaf.ndim, where
        for name in names:
            parts = name if isinstance(name, tuple) else (name,)
            assert all(p is None or p in AXIS_NAMES for p in parts), where
            assert not (isinstance(name, tuple) and None in name), where


def test_lora_factors_follow_their_weights_inputs_and_outputs(adapters):
    axes = _axes(adapters["lora_dora_all_linear"])["layers"]
    assert axes["q_proj"] == {"a": ("layers", "embed", None),
                              "b": ("layers", None, "heads", "head_dim"),
                              "magnitude": ("layers", "heads", "head_dim")}
    assert axes["o_proj"] == {"a": ("layers", "heads", "head_dim", None),
                              "b": ("layers", None, "embed"),
                              "magnitude": ("layers", "embed")}
    assert axes["down_proj"] == {"a": ("layers", "mlp", None), "b": ("layers", None, "embed"),
                                 "magnitude": ("layers", "embed")}
    pissa = _axes(adapters["lora_pissa"])["layers"]["v_proj"]
    assert pissa["init_a"] == ("layers", "embed", None)
    assert pissa["init_b"] == ("layers", None, "kv_heads", "head_dim")


def test_vector_methods_follow_the_side_they_scale_or_shift(adapters):
    ia3 = _axes(adapters["ia3_all_linear"])["layers"]
    assert ia3["k_proj"] == ("layers", "kv_heads", "head_dim")  # output
    assert ia3["o_proj"] == ("layers", "heads", "head_dim")  # feedforward: input
    assert ia3["down_proj"] == ("layers", "mlp")
    assert _axes(adapters["bitfit"])["layers"]["up_proj"] == ("layers", "mlp")
    assert _axes(adapters["ssf"])["layers"]["o_proj"] == {"scale": ("layers", "embed"),
                                                           "shift": ("layers", "embed")}
    norms = _axes(adapters["norm_tuning_all"])
    assert norms["final_norm"] == ("embed",)
    assert norms["layers"]["q_norm"] == ("layers", "head_dim")


def test_prompt_and_prefix_axes(adapters):
    assert _axes(adapters["prompt_tuning"]) == {"embedding": (None, "embed")}
    prefix = _axes(adapters["prefix_tuning"])["layers"]
    assert prefix["keys"] == prefix["values"] == ("layers", None, "kv_heads", "head_dim")
    projection = _axes(adapters["prefix_tuning_projection"])
    assert projection["layers"]["w2"] == ("layers", None, None, "kv_heads", "head_dim")
    assert projection["w1"] == (("kv_heads", "head_dim"), None)  # E = K * H, PEFT's token_dim


def test_s2ft_blocks_keep_their_bases_names_and_indices_replicate(adapters):
    axes = _axes(adapters["s2ft"])["layers"]
    assert axes["k_proj"] == ("layers", "embed", "kv_heads", "head_dim")
    assert axes["o_proj"] == ("layers", "heads", "head_dim", "embed")
    assert axes["down_proj"] == ("layers", "mlp", "embed")
    assert axes["attention"] == {"perm": (None, None), "count": (None,)}
    adapter = adapters["s2ft"]
    indexed, config = adapter.impl.split(adapter.delta, MODEL, adapter.config)
    axes = adapter.impl.delta_axes(indexed, MODEL, config)["layers"]
    assert axes["mlp"] == {"units": (None, None), "count": (None,)}
    assert axes["gate_proj"] == ("layers", "embed", "mlp")


def test_spiel_entries_take_the_flattened_weights_axes(adapters):
    q = _axes(adapters["spiel"])["layers"]["q_proj"]
    flat = ("layers", ("embed", "heads", "head_dim"))
    assert q == {"values": flat, "indices": flat, "candidates": flat, "candidate_grads": flat}
    assert _axes(adapters["spiel"])["layers"]["down_proj"]["values"] == (
        "layers", ("mlp", "embed"))


@pytest.mark.parametrize("case", ["lisa", "hft"])
def test_parked_layers_shard_exactly_like_the_base(adapters, case):
    adapter = adapters[case]
    axes = _axes(adapter)
    assert axes["parked"] == {name: PARAM_AXES[name] for name in adapter.delta["parked"]}
    assert axes["active"]["q_proj"] == (None, "embed", "heads", "head_dim")
    if case == "lisa":
        assert axes["parked"]["q_norm"] == ("layers", "head_dim")
        assert {k: axes[k] for k in ("embed", "lm_head", "final_norm")} == {
            "embed": ("vocab", "embed"), "lm_head": ("vocab", "embed"),
            "final_norm": ("embed",)}
        assert axes["active_layers"] == (None,)
    else:
        assert axes["active_layers"]["down_proj"] == (None,)


# Methods that compose cleanly share one train step (one compile each way): the weight
# editors together, each parked-layer method with one that only hooks activations.
SHARDED = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, PartitionSpec as P
    from jft.models import ModelConfig, RopeConfig, RuntimePolicy
    from jft.peft import create
    from jft.peft.base import partition
    from jft.peft.optim import masked_optimizer
    from jft.sharding import LogicalRules, MeshConfig, make_rules
    from jft.sharding.placement import put
    from jft.training.step import ShardedSteps
    from tests.hf_reference import random_params

    config = ModelConfig(family="llama", vocab_size=64, embed_dim=32, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48, norm_eps=1e-6,
                         rope=RopeConfig(), layer_types=("full", "full"),
                         policy=RuntimePolicy(dtype="float32"),
    )
    params = random_params(config, std=0.2)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (4, 12)), jnp.int32)
    batch = {"tokens": tokens, "segment_ids": jnp.ones((4, 12), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(12), (4, 12)),
             "loss_mask": jnp.ones((4, 12), bool)}
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    rules = LogicalRules(mesh, (("batch", ("data", "fsdp")), ("embed", "fsdp"),
                                ("heads", "tensor"), ("kv_heads", "tensor"),
                                ("mlp", "tensor"), ("vocab", "tensor")))
    one_device = make_rules(MeshConfig(), jax.devices()[:1])

    # method: (options, a large delta leaf that must end up sharded, its spec)
    CASES = {
        "s2ft": (dict(attention_ratio=0.5, attention_modules=["v_proj", "o_proj"],
                      mlp_ratio=0.25, mlp_modules=["up_proj", "down_proj"], scope="layer"),
                 ("layers", "up_proj"), P(None, "fsdp", "tensor")),
        "spiel": (dict(count=8), ("layers", "q_proj", "values"), P(None, ("fsdp", "tensor"))),
        "lora": (dict(dora=True, targets="all-linear", r=4), ("layers", "q_proj", "a"),
                 P(None, "fsdp", None)),
        "lisa": (dict(activated_layers=1), ("parked", "q_proj"),
                 P(None, "fsdp", "tensor", None)),
        "prefix_tuning": (dict(num_virtual_tokens=4), ("layers", "keys"),
                          P(None, None, "tensor", None)),
        "hft": ({}, ("active", "gate_proj"), P(None, "fsdp", "tensor")),
        "ia3": ({}, ("layers", "down_proj"), P(None, "tensor")),
    }
    GROUPS = (("s2ft", "spiel", "lora"), ("prefix_tuning", "lisa"), ("ia3", "hft"))

    def place(tree, axes):
        shardings = jax.tree.map(lambda a, x: rules.sharding(a, x.shape), axes, tree,
                                 is_leaf=lambda a: isinstance(a, tuple))
        return jax.device_put(tree, shardings)

    def leaf_at(tree, path):
        for key in path:
            tree = tree[key]
        return tree

    def train(on, adapters, base):
        # (trained adapters, their trainable deltas in numpy, last loss) of two steps
        # with the logical-axis rules `on`.
        optimizer = masked_optimizer(optax.sgd(0.5), adapters)
        steps = ShardedSteps(config, optimizer, on, base, adapters, 0)
        base, state = put(base, steps.params), steps.initial_state
        for _ in range(2):
            state, metrics = steps.train(state, base, batch)
        trained = partition(state.adapters)[0]
        return (state.adapters, [jax.tree.map(np.asarray, a.delta) for a in trained],
                float(metrics["loss"]))

    for group in GROUPS:
        base, adapters = params, []
        for method in group:
            base, adapter = create(method, jax.random.key(1), base, config, **CASES[method][0])
            adapters.append(adapter)
        _, expected, expected_loss = train(one_device, adapters, base)
        sharded = []
        for adapter in adapters:
            axes = adapter.impl.delta_axes(adapter.delta, config, adapter.config)
            delta = place(adapter.delta, axes)
            _, path, spec = CASES[adapter.method]
            leaf = leaf_at(delta, path)
            assert leaf.sharding.spec == spec, (adapter.method, leaf.sharding.spec)
            sharded.append(type(adapter)(delta, adapter.method, adapter.config))
        trained, got, loss = train(rules, sharded, base)
        for adapter in trained:  # the step keeps each delta in its layout
            _, path, spec = CASES[adapter.method]
            leaf = leaf_at(adapter.delta, path)
            assert leaf.sharding.spec == spec, (adapter.method, "trained", leaf.sharding.spec)
        np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, err_msg=str(group))
        for method, g, e in zip(group, got, expected, strict=True):
            assert any(np.abs(x).sum() > 0 for x in jax.tree.leaves(e)), method
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5,
                                                                 err_msg=method), g, e)
    print("ok")
    """
)


def test_training_with_sharded_deltas_equals_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True,
                         text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"
