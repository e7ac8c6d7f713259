"""Logical axis names map onto a mesh by rules, without touching model code."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from jft.models import ModelConfig, RuntimePolicy, RopeConfig, forward, init_params, param_axes
    from jft.sharding import LogicalRules, use_rules

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    rules = LogicalRules(mesh, (("batch", "data"), ("heads", "model"), ("mlp", "model"),
                                ("vocab", "model"), ("kv_heads", "model")))
    # A dimension the axis does not divide stays replicated on it.
    assert rules.spec(("batch", "heads"), (4, 6)) == P("data", None)
    assert rules.spec(("batch", "mlp"), (4, 8)) == P("data", "model")
    # A mesh axis is used once per tensor.
    assert rules.spec(("heads", "mlp"), (8, 8)) == P("model", None)

    config = ModelConfig(family="llama", vocab_size=64, embed_dim=32, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48, norm_eps=1e-6,
                         rope=RopeConfig(), layer_types=("full", "full"),
                         policy=RuntimePolicy(dtype="float32"),
    )
    params = init_params(config, jax.random.key(0), std=0.2)
    tokens = jax.random.randint(jax.random.key(1), (4, 12), 0, 64)
    expected = forward(config, params, tokens)
    shardings = jax.tree.map(lambda axes, x: rules.sharding(axes, x.shape),
                             param_axes(params), params, is_leaf=lambda x: isinstance(x, tuple))
    sharded = jax.device_put(params, shardings)
    assert sharded["layers"]["gate_proj"].sharding.spec == P(None, None, "model")

    def run(params, tokens):
        with use_rules(rules):
            return forward(config, params, tokens)

    logits = jax.jit(run)(sharded, tokens)
    assert logits.sharding.spec == P("data", None, "model"), logits.sharding.spec
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-5)
    print("ok")
    """
)


def test_forward_under_logical_rules_on_8_devices_equals_unsharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"
