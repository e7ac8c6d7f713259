"""Quantized frozen bases (`jft.quant`): the formats against bitsandbytes and gguf, and a
quantized model against the float model its dequantized weights make."""

from __future__ import annotations

from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from gguf import GGMLQuantizationType as Q
from scipy.stats import norm

import jft
from jft.errors import JftError, run_cli
from jft.models import forward
from jft.peft import create
from jft.quant import codebooks, dequantize, quantize
from jft.quant.formats import FORMATS
from jft.quant.params import dequantize_params, quantized_bytes
from tests.gguf_writer import write_gguf
from tests.hf_reference import make_hf_model, save_hf_model, save_tiny_smollm2

ROOT = Path(__file__).resolve().parents[1]
torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes.functional")


def _random(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * rng.uniform(0.05, 3)).astype(np.float32)


def test_nf4_is_the_qlora_papers_normal_quantiles():
    offset = 0.9677083  # QLoRA's, chosen so the extreme levels are +-1 after normalising
    positive = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    negative = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    levels = np.sort(np.concatenate([positive, [0.0], negative]))
    np.testing.assert_allclose(codebooks.NF4, levels / levels.max(), atol=2e-7)
    assert list(codebooks.NF4) == sorted(codebooks.NF4) and codebooks.NF4[7] == 0


def test_codebooks_equal_bitsandbytes():
    np.testing.assert_array_equal(codebooks.NF4, bnb.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_equal(codebooks.FP4, bnb.get_4bit_type("fp4", device="cpu").numpy())
    np.testing.assert_array_equal(codebooks.DYNAMIC, bnb.create_dynamic_map().numpy())


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(4096,), (999,), (64 * 30 + 7,), (48, 256)],
                         ids=["aligned", "ragged-odd", "ragged", "matrix"])
def test_4bit_quantization_is_bitsandbytes_bit_for_bit(kind, shape):
    x = _random(shape, seed=len(shape) + shape[-1])
    packed, state = bnb.quantize_4bit(torch.tensor(x), blocksize=64, quant_type=kind)
    ours = quantize(x.reshape(-1), kind, 64)
    np.testing.assert_array_equal(ours.codes[:packed.numel()], packed.numpy().reshape(-1))
    np.testing.assert_array_equal(ours.scales, state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(dequantize(ours)),
                                  bnb.dequantize_4bit(packed, state).numpy().reshape(-1))
    if len(shape) == 2:  # a weight quantized along its rows: the same bytes, row by row
        by_rows = quantize(x, kind, 64)
        np.testing.assert_array_equal(by_rows.codes.reshape(-1), packed.numpy().reshape(-1))


@pytest.mark.parametrize("size", [64 * 256 * 3, 64 * 1000 + 13])
def test_double_quantization_against_bitsandbytes(size):
    """The second level (scales minus their mean, 8-bit dynamic map, blocks of 256).
    bitsandbytes' CPU search returns the farther of two neighbouring codes for a few
    values near a midpoint, and its float32 mean sums in another order: we round to the
    nearest code, so the codes agree nearly everywhere and ours are never less accurate."""
    x = _random(size, seed=size)
    packed, state = bnb.quantize_4bit(torch.tensor(x), blocksize=64, quant_type="nf4",
                                      compress_statistics=True)
    plain = quantize(x, "nf4", 64)
    ours = quantize(x, "nf4", 64, double_quant=True)
    np.testing.assert_array_equal(ours.codes[:packed.numel()], packed.numpy().reshape(-1))
    np.testing.assert_allclose(ours.scale_offset, state.offset.item(), rtol=1e-6)
    np.testing.assert_allclose(ours.scale_absmax, state.state2.absmax.numpy(), rtol=1e-6)
    assert np.mean(ours.scales == state.absmax.numpy()) > 0.995
    theirs = bnb.dequantize_blockwise(state.absmax, state.state2).numpy() + state.offset.item()
    from jft.quant.tensor import dequantize_scales

    mine = np.asarray(dequantize_scales(ours.scales, ours.scale_absmax, ours.scale_offset))
    assert np.abs(mine - plain.scales).mean() <= np.abs(theirs - plain.scales).mean() * 1.0001
    # QLoRA's saving: 8 bits per 64 values and 32 per 256 blocks, not 32 per 64 values
    assert ours.nbytes * 8 / size < 4.16 < 4.5 <= plain.nbytes * 8 / size


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_gguf_formats_dequantize_as_gguf_does(kind):
    x = _random((6, 96), seed=3)
    stored = gguf.quants.quantize(x, Q[kind.upper()])
    codes, scales = FORMATS[kind].split(stored)
    tensor = quantize(x, kind)
    np.testing.assert_array_equal(tensor.codes, codes)
    np.testing.assert_array_equal(tensor.scales, scales)
    np.testing.assert_array_equal(FORMATS[kind].join(codes, scales), stored)
    np.testing.assert_array_equal(np.asarray(dequantize(tensor)),
                                  gguf.quants.dequantize(stored, Q[kind.upper()]))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    save_hf_model("llama", directory)
    return directory


@pytest.fixture(scope="module")
def nf4_llama(llama_dir):
    return jft.load(llama_dir, dtype="float32", quantize="nf4", quantize_block=32)


def _logits(model, params, adapters=()):
    config = model.config.replace(dtype="float32", kernels="xla")
    tokens = np.random.default_rng(0).integers(3, 100, size=(2, 9))
    return np.asarray(forward(config, params, tokens, adapters=adapters))


@pytest.mark.parametrize("settings", [
    dict(quantize="nf4", quantize_embeddings=True, quantize_block=32),
    dict(quantize="fp4", double_quant=False), dict(quantize="int8")], ids=str)
def test_a_quantized_model_is_its_dequantized_float_model(llama_dir, settings):
    model = jft.load(llama_dir, dtype="float32", **settings)
    floats = dequantize_params(model.params, model.config)
    np.testing.assert_allclose(_logits(model, model.params), _logits(model, floats),
                               rtol=1e-5, atol=1e-5)
    original = jft.load(llama_dir, dtype="float32")
    assert quantized_bytes(model.params) < quantized_bytes(original.params) * (
        0.45 if settings["quantize"] == "int8" else 0.35)
    assert model.quantization.errors["float32"]  # every weight converted, error measured
    assert 0 < max(model.quantization.errors["float32"]) < (0.02 if settings["quantize"]
                                                            == "int8" else 0.15)


@pytest.mark.parametrize("method, options", [
    ("lora", dict(r=4, targets="all-linear")),
    ("lora", dict(r=4, targets="all-linear", dora=True, rslora=True)),
    ("ia3", {}), ("prompt_tuning", dict(num_virtual_tokens=3)),
    ("s2ft", {}),
])
def test_methods_train_beside_a_quantized_base(nf4_llama, method, options):
    """The adapter on the quantized base computes what it computes on the dequantized one."""
    model = nf4_llama
    key = jax.random.key(0)
    base, adapter = create(method, key, model.params, model.config, **options)
    # S2FT moves the base's units (co-permutation): the base it returns is quantized too
    assert jax.tree.structure(base) == jax.tree.structure(model.params)
    floats = dequantize_params(base, model.config)
    _, on_floats = create(method, key, dequantize_params(model.params, model.config),
                          model.config, **options)
    # a delta that changes the output (LoRA's B starts at zero)
    delta = jax.tree.map(lambda x: x + 0.01, adapter.delta)
    adapter, on_floats = (a.__class__(delta, a.method, a.config) for a in (adapter, on_floats))
    np.testing.assert_allclose(_logits(model, base, [adapter]),
                               _logits(model, floats, [on_floats]), rtol=1e-4, atol=1e-4)


def test_the_fused_kernel_computes_the_quantized_linear(nf4_llama):
    pallas = nf4_llama.config.replace(dtype="float32", kernels="pallas")
    tokens = np.random.default_rng(1).integers(3, 100, size=(1, 5))
    fused = forward(pallas, nf4_llama.params, tokens)
    reference = forward(pallas.replace(kernels="xla"), nf4_llama.params, tokens)
    np.testing.assert_allclose(np.asarray(fused), np.asarray(reference), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["full", "lisa", "hft", "spiel"])
def test_methods_that_train_base_weights_refuse_a_quantized_base(nf4_llama, method):
    model = nf4_llama
    with pytest.raises(JftError, match=f"method '{method}' trains the base's own weights"):
        create(method, jax.random.key(0), model.params, model.config)


def test_gguf_q8_0_and_q4_0_tensors_are_kept_as_stored(tmp_path):
    hf_model = make_hf_model("llama")
    layers = hf_model.config.num_hidden_layers
    types = {f"blk.{i}.ffn_up.weight": Q.Q4_0 for i in range(layers)}
    types["blk.1.ffn_down.weight"] = Q.F16  # a site of mixed types is converted whole
    path = write_gguf(hf_model, tmp_path / "m.gguf", "llama", Q.Q8_0, types)
    model = jft.load(path, dtype="float32", quantize="nf4", quantize_block=32)
    assert model.quantization.kept == {"Q8_0": 5 * layers, "Q4_0": layers}
    assert {kind: len(errors) for kind, errors in model.quantization.errors.items()} == {
        "Q8_0": layers - 1, "F16": 1}
    assert model.params["layers"]["up_proj"].format == "q4_0"
    assert model.params["layers"]["down_proj"].format == "nf4"
    # the bytes are the file's: decoding them in JAX gives gguf's decoding of the file
    reference = jft.load(path, dtype="float32")
    floats = dequantize_params(model.params, model.config)
    for name in ("q_proj", "k_proj", "up_proj"):  # k: llama.cpp's permuted rows, undone
        if model.params["layers"][name].format in ("q8_0", "q4_0"):
            np.testing.assert_array_equal(np.asarray(floats["layers"][name]),
                                          np.asarray(reference.params["layers"][name]))
    np.testing.assert_allclose(_logits(model, model.params), _logits(model, floats),
                               rtol=1e-5, atol=1e-5)


def test_stacked_layers_keep_their_own_double_quantization(nf4_llama):
    model = nf4_llama
    weight = model.params["layers"]["q_proj"]
    layers = model.config.num_layers
    assert weight.scale_offset.shape == (layers,) and weight.scale_absmax.shape[0] == layers
    one = jax.tree.map(lambda a: a[1], weight)  # what the layer scan hands layer 1
    np.testing.assert_array_equal(np.asarray(dequantize(one)),
                                  np.asarray(dequantize(weight))[1])
    assert one.codes.dtype == jnp.uint8


def test_a_loftq_qlora_run_trains_loads_and_exports_as_it_trained(tmp_path):
    """`quantize: nf4` and `init: loftq` from the command line: LoftQ runs as the base is
    quantized; loading the run quantizes its base the same way; a merged export folds the
    adapter into the dequantized weights, so the exported model is the run's model."""
    from jft import export, train

    model = save_tiny_smollm2(tmp_path / "tiny")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(model), "quantize": "nf4", "quantize_block": 32,
        "method": {"name": "lora", "r": 4, "alpha": 8, "targets": "all-linear",
                   "init": "loftq", "init_options": {"loftq_iter": 2}},
        "data": {"train": str(ROOT / "examples/quickstart/train.jsonl"),
                 "format": "prompt_completion", "max_length": 48},
        "train": {"steps": 3, "batch_size": 2, "learning_rate": 5e-3},
        "checkpoint": {"every": 3}, "output_dir": str(tmp_path / "run")}))
    assert run_cli(lambda args: train.fine_tune(args[0]) and 0, [str(config)]) == 0
    run = jft.load(model, adapter=tmp_path / "run", dtype="float32")
    assert run.params["layers"]["q_proj"].format == "nf4"
    out = tmp_path / "merged"
    assert export.main([str(tmp_path / "run"), "--format", "merged", "--dtype", "fp32",
                        "--out", str(out)]) == 0
    merged = jft.load(out, dtype="float32")
    tokens = np.random.default_rng(0).integers(3, 100, size=(1, 7))
    np.testing.assert_allclose(
        np.asarray(forward(merged.config, merged.params, tokens)),
        np.asarray(forward(run.config.replace(kernels="xla"), run.params, tokens,
                           adapters=run.adapters)), rtol=1e-5, atol=1e-5)
    # a float base was never what it trained on
    float_run = jft.load(model, adapter=tmp_path / "run", dtype="float32", quantize="none")
    assert not np.allclose(np.asarray(forward(float_run.config, float_run.params, tokens,
                                              adapters=float_run.adapters)),
                           np.asarray(forward(merged.config, merged.params, tokens)), atol=1e-3)


@pytest.mark.parametrize("keys, message", [
    ({"method": {"name": "lora", "init": "loftq"}}, "method.init: loftq needs a quantized base"),
    ({"quantize": "nf5"}, "quantize"),
    ({"quantize": "nf4", "quantize_block": 48}, "quantize_block=48; valid: 32, 64"),
], ids=["loftq-without-quantize", "format", "block"])
def test_quantization_keys_are_checked_with_the_config(tmp_path, keys, message):
    from jft.training.config import from_dict

    with pytest.raises(JftError, match=message):
        from_dict({"model": "smollm2-135m-instruct", "output_dir": str(tmp_path),
                   "data": {"train": "x.jsonl"}, **keys}, check_paths=False)


_MESH_SCRIPT = """
import sys
import jax, numpy as np, optax
import jft
from jft.peft import create
from jft.sharding import MeshConfig, make_rules
from jft.training.step import ShardedSteps

def step_loss(rules):
    model = jft.load(sys.argv[1], dtype="float32", quantize="nf4", quantize_block=32,
                     rules=rules)
    base, adapter = create("lora", jax.random.key(0), model.params, model.config, r=4,
                           targets="all-linear")
    steps = ShardedSteps(model.config.replace(kernels="xla"), optax.sgd(0.1), rules, base,
                         [adapter], 0)
    tokens = np.random.default_rng(0).integers(3, 100, size=(8, 12)).astype(np.int32)
    batch = {"tokens": tokens, "positions": np.tile(np.arange(12, dtype=np.int32), (8, 1)),
             "segment_ids": np.ones_like(tokens), "loss_mask": np.ones_like(tokens, bool)}
    state, first = steps.train(steps.initial_state, base, batch)
    _, second = steps.train(state, base, batch)
    return model.params, float(first["loss"]), float(second["loss"])

params, *mesh_losses = step_loss(make_rules(MeshConfig(fsdp=4, tensor=2), jax.devices()))
codes = params["layers"]["q_proj"].codes
assert not codes.sharding.is_fully_replicated, codes.sharding
assert len({s.data.shape for s in codes.addressable_shards}) == 1
_, *one_losses = step_loss(make_rules(MeshConfig(fsdp=1), jax.devices()[:1]))
np.testing.assert_allclose(mesh_losses, one_losses, rtol=2e-4)
print("ok", codes.sharding.spec, mesh_losses)
"""


def test_qlora_trains_on_a_mesh_as_on_one_device(llama_dir):
    """A quantized base shards like the float one (codes and scales on the weight's
    logical axes): two LoRA steps on a 4 x 2 (fsdp, tensor) mesh of virtual devices give
    one device's losses."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, str(llama_dir)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def test_a_training_step_holds_one_layer_dequantized_at_a_time():
    """The promise of a quantized base: the train step's temporaries are what the float
    model's are, never every layer's dequantized weight (the layer scan would keep them
    all for the backward pass, unless the dequantization is recomputed there)."""
    import optax

    from jft.models import config_from_hf
    from jft.models.sites import linear_sites
    from jft.models.transformer import init_params
    from jft.peft.optim import masked_optimizer
    from jft.quant.params import weight_to_matrix
    from jft.training.step import _train_step, init_state

    config = config_from_hf({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 64,
        "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 8,
        "num_attention_heads": 4, "num_key_value_heads": 4, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True}, "wide").replace(dtype="float32", kernels="xla")
    floats = init_params(config, jax.random.key(0))
    sites = {site.name: site for site in linear_sites(config)}
    nf4 = dict(floats, layers={
        key: quantize(weight_to_matrix(sites[key], np.asarray(value), 1), "nf4", 64, True, 1)
        if key in sites else value for key, value in floats["layers"].items()})
    nf4 = jax.tree.map(jnp.asarray, nf4)
    batch = {"tokens": np.ones((1, 8), np.int32), "positions": np.arange(8, dtype=np.int32)[None],
             "segment_ids": np.ones((1, 8), np.int32), "loss_mask": np.ones((1, 8), bool)}
    one_layer = sum(value[0].nbytes for key, value in floats["layers"].items() if key in sites)
    temporaries = {}
    for name, base in (("float", floats), ("nf4", nf4)):
        _, adapter = create("lora", jax.random.key(0), base, config, r=4, targets="all-linear")
        optimizer = masked_optimizer(optax.sgd(0.1), [adapter])
        state = init_state([adapter], optimizer, 0)
        compiled = jax.jit(_train_step, static_argnums=(0, 1)).lower(
            config, optimizer, state, base, batch).compile()
        temporaries[name] = compiled.memory_analysis().temp_size_in_bytes
    assert temporaries["nf4"] < 1.05 * temporaries["float"]
    assert temporaries["nf4"] < 2 * one_layer < config.num_layers * one_layer


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_a_checkpoint_that_does_not_fit_its_config_is_one_line(llama_dir, tmp_path, quantize):
    import json
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] += 32
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(JftError, match=r"model.safetensors: tensor 'model.layers.0.mlp.gate_proj"
                                       r".weight' has shape \[96, 64\], which does not fit the "
                                       r"config \(expected \[128, 64\]\)"):
        jft.load(broken, dtype="float32", quantize=quantize)
