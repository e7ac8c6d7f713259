"""Data, FSDP and tensor parallelism on a (data, fsdp, tensor) mesh of 8 virtual CPU devices:
the mesh from config, the rules, training that equals one device, bytes per device, the CLI
with mesh overrides, resuming onto another mesh, and two processes on jax.distributed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from jft.errors import JftError
from jft.sharding import LogicalRules, MeshConfig, ReplicatedWarning
from tests.test_train_cli import ROOT, _config, _metrics, tiny_model  # noqa: F401

EIGHT = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")


def test_mesh_sizes_resolve_the_rest_and_refuse_what_does_not_fit():
    assert MeshConfig().shape(8) == (1, 8, 1)  # the default: every device for FSDP
    assert MeshConfig(data=2, fsdp=-1, tensor=2).shape(8) == (2, 2, 2)
    assert MeshConfig(data=-1, fsdp=1, tensor=4).shape(8) == (2, 1, 4)
    for config, words in ((MeshConfig(data=3), "do not split"),
                          (MeshConfig(data=2, fsdp=2, tensor=1), "= 4, but there are 8"),
                          (MeshConfig(data=-1, fsdp=-1), "more than one"),
                          (MeshConfig(tensor=0), "mesh.tensor=0")):
        with pytest.raises(JftError, match=words):
            config.shape(8)


def test_presets_and_overrides():
    table = dict(MeshConfig(preset="fsdp_tp", rules={"vocab": None, "mlp": ["fsdp", "tensor"]})
                 .rule_table())
    assert table["embed"] == "fsdp" and table["heads"] == "tensor"
    assert table["vocab"] is None and table["mlp"] == ("fsdp", "tensor")
    assert dict(MeshConfig(preset="data_parallel").rule_table()) == {
        "batch": ("data", "fsdp")}
    with pytest.raises(JftError, match="mesh.rules.vocab='model'.*valid: data, fsdp, tensor"):
        MeshConfig(rules={"vocab": "model"}).rule_table()
    with pytest.raises(JftError, match="mesh.preset='zero3'; valid: data_parallel, fsdp"):
        MeshConfig(preset="zero3").rule_table()


def test_an_axis_that_does_not_divide_replicates_with_a_warning_naming_the_tensor():
    rules = LogicalRules(AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor")),
                         MeshConfig(rules={"mlp": ["fsdp", "tensor"]}).rule_table())
    message = (r"layers/k_proj: dimension 2 \(kv_heads, size 3\) does not split over "
               r"tensor=2; it stays replicated on 'tensor'")
    with pytest.warns(ReplicatedWarning, match=message):
        spec = rules.spec(("layers", "embed", "kv_heads", "head_dim"), (2, 8, 3, 4),
                          "layers/k_proj")
    assert spec == P(None, "fsdp", None, None)
    # Both axes of a dimension, then only those that still divide it.
    assert rules.spec(("mlp",), (8,)) == P(("fsdp", "tensor"))
    with pytest.warns(ReplicatedWarning, match="mlp_bias.*over fsdp=2 x tensor=2"):
        assert rules.spec(("mlp",), (6,), "mlp_bias") == P("fsdp")
    # A flattened dimension takes the mesh axes of every name it flattens.
    assert rules.spec(("layers", ("embed", "heads")), (2, 64)) == P(None, ("fsdp", "tensor"))
    assert rules.spec(("batch", "seq"), (4, 16)) == P(("data", "fsdp"), None)


EQUIVALENCE = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import PartitionSpec as P
    from jft.models import ModelConfig, RuntimePolicy, RopeConfig, init_params
    from jft.peft import create
    from jft.peft.optim import masked_optimizer
    from jft.sharding import MeshConfig, make_rules
    from jft.sharding.placement import batch_shardings, bytes_per_device, put, total_bytes
    from jft.training.step import ShardedSteps

    config = ModelConfig(family="llama", vocab_size=64, embed_dim=32, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48, norm_eps=1e-6,
                         rope=RopeConfig(), layer_types=("full", "full"),
                         policy=RuntimePolicy(dtype="float32"),
    )
    params = init_params(config, jax.random.key(0), std=0.2)
    tokens = np.asarray(jax.random.randint(jax.random.key(2), (8, 12), 0, 64))
    batch = {"tokens": tokens, "segment_ids": np.ones((8, 12), np.int32),
             "positions": np.broadcast_to(np.arange(12), (8, 12)).copy(),
             "loss_mask": np.ones((8, 12), bool)}
    methods = {"full": {}, "lora": dict(targets="all-linear", r=4),
               "s2ft": dict(attention_ratio=0.5, mlp_ratio=0.25)}
    for method, options in methods.items():
        base, adapter = create(method, jax.random.key(1), params, config, **options)
        optimizer = masked_optimizer(optax.adamw(1e-2), [adapter])
        # The reference: the same steps on a mesh of one device.
        one = ShardedSteps(config, optimizer, make_rules(MeshConfig(), jax.devices()[:1]), base,
                           [adapter], 0)
        state, expected = one.initial_state, []
        for _ in range(3):
            state, metrics = one.train(state, base, batch)
            expected.append(float(metrics["loss"]))
        expected_delta = state.adapters[0].delta
        for shape in ((8, 1, 1), (1, 8, 1), (2, 2, 2)):
            rules = make_rules(MeshConfig(*shape))
            steps = ShardedSteps(config, optimizer, rules, base, [adapter], 0)
            sharded_base = put(base, steps.params)
            state, losses = steps.initial_state, []
            for _ in range(3):
                state, metrics = steps.train(state, sharded_base, batch)
                losses.append(float(metrics["loss"]))
            np.testing.assert_allclose(losses, expected, rtol=1e-6, err_msg=f"{method} {shape}")
            for got, want in zip(jax.tree.leaves(state.adapters[0].delta),
                                 jax.tree.leaves(expected_delta), strict=True):
                np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5,
                                           err_msg=f"{method} {shape}")
            share = max(bytes_per_device(sharded_base).values()) / total_bytes(sharded_base)
            # Replicated only under pure data parallelism; else about total / shards.
            bound = {(8, 1, 1): 1.0, (1, 8, 1): 1 / 8, (2, 2, 2): 1 / 4}[shape]
            assert bound <= share <= bound * 1.02, (method, shape, share)
            if method == "lora" and shape == (2, 2, 2):
                a = state.adapters[0].delta["layers"]["down_proj"]["a"]  # [L, F, r]
                assert a.sharding.spec == P(None, "tensor", None), a.sharding.spec
                b = state.adapters[0].delta["layers"]["down_proj"]["b"]  # [L, r, D]
                assert b.sharding.spec == P(None, None, "fsdp"), b.sharding.spec
                moments = [x for x in jax.tree.leaves(state.opt_state)
                           if x.shape == a.shape]
                assert moments and all(m.sharding == a.sharding for m in moments)
                spec = batch_shardings(rules, batch)["tokens"].spec
                assert spec == P(("data", "fsdp"), None), spec
    print("ok")
    """
)


def test_full_lora_and_s2ft_on_three_meshes_equal_one_device():
    out = subprocess.run([sys.executable, "-c", EQUIVALENCE], env=EIGHT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"


def _jft_train(config, *extra, env=EIGHT):
    return subprocess.Popen([sys.executable, "-m", "jft.train", str(config), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env)


def _finish(process):
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return stdout, stderr


def test_cli_on_a_mesh_resumes_onto_another_and_its_adapter_loads_on_one_device(
        tiny_model, tmp_path):  # noqa: F811
    import jft

    config = _config(tmp_path, tiny_model, eval={"every": 0}, **{
        "data.eval": None, "train.steps": 4, "train.batch_size": 8,
        "train.schedule": "constant"})
    one = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    _finish(_jft_train(config, f"output_dir={tmp_path / 'one'}", env=one))
    _, stderr = _finish(_jft_train(config, "train.steps=2", "mesh.data=2", "mesh.fsdp=2",
                                   "mesh.tensor=2"))
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in stderr
    _finish(_jft_train(config, "mesh.fsdp=8"))  # resumes step 2 with another layout
    expected = [r["loss"] for r in _metrics(tmp_path / "one")]
    got = [r["loss"] for r in _metrics(tmp_path / "run")]
    assert len(got) == 4
    assert got == pytest.approx(expected, rel=1e-5)
    model = jft.load(tiny_model, adapter=tmp_path / "run")  # saved on 8 devices
    reference = jft.load(tiny_model, adapter=tmp_path / "one")
    for got, want in zip(jax_leaves(model.adapters[0].delta),
                         jax_leaves(reference.adapters[0].delta), strict=True):
        assert abs(got - want).max() < 1e-5


def jax_leaves(tree):
    import jax
    import numpy as np

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def test_two_processes_on_jax_distributed_train_as_one(tiny_model, tmp_path):  # noqa: F811
    config = _config(tmp_path, tiny_model, eval={"every": 0}, **{
        "data.eval": None, "train.steps": 3, "train.batch_size": 8,
        "checkpoint.every": 0})
    _finish(_jft_train(config, f"output_dir={tmp_path / 'single'}"))
    four = dict(EIGHT, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    address = f"localhost:{_free_port()}"
    processes = [
        _jft_train(config, "--coordinator-address", address, "--num-processes", "2",
                   "--process-id", str(i), env=four)
        for i in range(2)
    ]
    (main_out, main_err), (other_out, other_err) = [_finish(p) for p in processes]
    assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in main_err
    assert "step 3" in main_out and "step" not in other_out  # only process 0 logs
    expected = [r["loss"] for r in _metrics(tmp_path / "single")]
    assert [r["loss"] for r in _metrics(tmp_path / "run")] == pytest.approx(expected, rel=1e-5)
    state = tmp_path / "run/checkpoints/3/state"  # each process wrote its own shards
    assert (state / "ocdbt.process_0").is_dir() and (state / "ocdbt.process_1").is_dir()


def test_a_mesh_that_does_not_fit_and_half_the_cluster_flags_get_one_line(
        tiny_model, tmp_path):  # noqa: F811
    config = _config(tmp_path, tiny_model)
    for extra, words in ((["mesh.data=3"], "error: mesh: 8 devices do not split"),
                         (["--num-processes", "2"], "error: --coordinator-address, "
                                                    "--num-processes and --process-id go")):
        process = _jft_train(config, *extra)
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 2 and stderr.startswith(words), stderr[-2000:]
        assert stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()
