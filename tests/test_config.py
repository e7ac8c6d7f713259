"""The training config: YAML + overrides, up-front validation, fingerprint, optimizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml

from jft.errors import JftError
from jft.peft import REGISTRY, make_config
from jft.training.config import (
    TrainConfig,
    TrainSection,
    build_optimizer,
    build_schedule,
    from_dict,
    load_config,
    wrap_accumulation,
)

FULL_YAML = """\
model: smollm2-135m-instruct
model_dtype: bfloat16
compute_dtype: float32
remat: dots
kernels: xla
quantize: nf4
quantize_block: 128
double_quant: false
quantize_embeddings: true
objective: sft
method:
  name: lora
  r: 16
  alpha: 32
  targets: [q_proj, v_proj, down_proj]
  layers_to_transform: [0, 1]
  dropout: 0.05
  rslora: true
  dora: false
  init: eva
  init_options: {{rho: 2.0}}
  calibration_batches: 4
data:
  train: {train}
  eval: {eval}
  format: chat
  max_length: 256
  packing: false
  completion_only_loss: false
  overlong: drop
  streaming: true
train:
  steps: 500
  batch_size: 4
  grad_accum: 2
  learning_rate: 1e-4
  schedule: linear
  warmup_steps: 50
  min_lr_ratio: 0.1
  weight_decay: 0.01
  weight_decay_on: [b]
  grad_clip: 0.5
  optimizer: adamw
  beta1: 0.9
  beta2: 0.95
  momentum: 0.0
  seed: 7
  max_bad_steps: 3
  log_every: 10
eval:
  every: 100
  generate: true
  max_new_tokens: 32
  batch_size: 2
  max_examples: 50
checkpoint:
  every: 200
  keep: 2
mesh:
  data: 2
  fsdp: -1
  tensor: 2
  preset: fsdp
  rules:
    vocab: tensor
    mlp: [fsdp, tensor]
moe:
  impl: dense
  aux_loss_coef: 0.01
  z_loss_coef: 0.001
output_dir: {out}
"""


@pytest.fixture
def files(tmp_path):
    train = tmp_path / "train.jsonl"
    held_out = tmp_path / "eval.jsonl"
    train.write_text('{"prompt": "a", "completion": "b"}\n')
    held_out.write_text('{"prompt": "a", "completion": "b"}\n')
    return {"train": str(train), "eval": str(held_out), "out": str(tmp_path / "run")}


@pytest.fixture
def minimal(tmp_path, files):
    """A minimal valid config file; returns its path."""
    path = tmp_path / "minimal.yaml"
    path.write_text(
        f"model: gemma3-270m\ndata:\n  train: {files['train']}\noutput_dir: {files['out']}\n"
    )
    return str(path)


def _error(path, overrides=(), **kwargs) -> str:
    with pytest.raises(JftError) as info:
        load_config(path, list(overrides), **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------- loading


def test_full_yaml_round_trips(tmp_path, files):
    path = tmp_path / "full.yaml"
    path.write_text(FULL_YAML.format(**files))
    config = load_config(str(path), [])
    expected = yaml.safe_load(FULL_YAML.format(**files))
    expected["train"]["learning_rate"] = 1e-4  # PyYAML alone reads `1e-4` as a string
    # The method's options come back resolved: the given ones (ints made floats where the
    # option is a float) plus the method's defaults.
    method = expected.pop("method")
    resolved = config.to_dict()
    assert resolved.pop("method") == {
        "name": "lora", "calibration_batches": 4, "r": 16, "alpha": 32.0,
        "targets": ["q_proj", "v_proj", "down_proj"], "layers_to_transform": [0, 1],
        "dropout": 0.05, "rslora": True, "dora": False, "init": "eva",
        "rank_pattern": {}, "alpha_pattern": {}, "init_options": {"rho": 2.0},
    }
    assert resolved == expected
    assert list(config.to_dict()) == list(yaml.safe_load(FULL_YAML.format(**files)))
    assert method["r"] == config.method.options["r"]
    assert config.train.learning_rate == 1e-4 and isinstance(config.train.learning_rate, float)
    assert config.method.needs_calibration

    # to_dict is YAML-serialisable and reads back to the same config and fingerprint.
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(config.to_dict()))
    reloaded = load_config(str(again), [])
    assert reloaded == config
    assert reloaded.fingerprint() == config.fingerprint()
    assert from_dict(config.to_dict()) == config
    # The resolved options rebuild the same method config.
    assert make_config("lora", config.method.options) == config.method.config


def test_defaults(minimal):
    config = load_config(minimal, [])
    assert config.method.name == "lora" and config.method.options["r"] == 8
    assert config.data.format == "prompt_completion" and config.data.max_length == 512
    assert config.data.packing and config.data.completion_only_loss
    assert (config.train.steps, config.train.batch_size, config.train.grad_accum) == (100, 8, 1)
    assert config.train.learning_rate == 2e-4 and config.train.grad_clip == 1.0
    assert (config.train.max_bad_steps, config.train.log_every) == (10, 1)
    assert (config.eval.every, config.eval.generate, config.eval.max_new_tokens) == (0, False, 64)
    assert (config.checkpoint.every, config.checkpoint.keep) == (0, 3)
    assert (config.model_dtype, config.compute_dtype, config.remat) == ("auto", "auto", "none")
    assert config.kernels == "auto"


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_method_round_trips(files, method):
    raw = {"model": "gemma3-270m", "output_dir": files["out"], "data": {"train": files["train"]},
           "method": {"name": method}}
    config = from_dict(raw)
    assert from_dict(config.to_dict()) == config
    assert config.method.config == make_config(method, {})
    hash(make_config(method, config.method.options))  # the method's config stays hashable


def test_overrides_of_each_type(minimal, files):
    config = load_config(minimal, [
        "train.steps=10",
        "train.learning_rate=3e-5",
        "train.grad_clip=0",
        f"data.eval={files['eval']}",
        "eval.generate=true",
        "method.targets=[q_proj,v_proj]",
        "method.alpha=16",
        "data.format=text",
        "checkpoint.keep=5",
        "model=smollm2-135m-instruct",
    ])
    assert config.train.steps == 10
    assert config.train.learning_rate == 3e-5
    assert config.train.grad_clip == 0.0 and isinstance(config.train.grad_clip, float)
    assert config.eval.generate is True and config.data.eval == files["eval"]
    assert config.method.options["targets"] == ["q_proj", "v_proj"]
    assert config.method.options["alpha"] == 16.0
    assert config.data.format == "text"
    assert config.checkpoint.keep == 5
    assert config.model == "smollm2-135m-instruct"
    # null clears a key; a later override wins.
    config = load_config(minimal, [f"data.eval={files['eval']}", "data.eval=null"])
    assert config.data.eval is None
    config = load_config(minimal, ["train.steps=5", "train.steps=6"])
    assert config.train.steps == 6


def test_no_file_only_overrides(files):
    config = load_config(None, ["model=gemma3-270m", f"data.train={files['train']}",
                                f"output_dir={files['out']}", "method.name=ia3"])
    assert config.method.name == "ia3" and config.model == "gemma3-270m"


# ---------------------------------------------------------------------------- errors


def test_file_errors(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    assert "nope.yaml" in _error(missing) and "does not exist" in _error(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    message = _error(str(bad))
    assert "bad.yaml" in message and "not valid YAML" in message
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("- a\n- b\n")
    message = _error(str(scalar))
    assert "scalar.yaml" in message and "mapping" in message


def test_unknown_keys_name_the_dotted_key_and_the_valid_ones(minimal):
    message = _error(minimal, ["train.stepz=3"])
    assert "'train.stepz'" in message and "steps" in message and "grad_accum" in message
    assert "override 'train.stepz=3'" in message
    message = _error(minimal, ["trian.steps=3"])
    assert "'trian'" in message and "train" in message and "checkpoint" in message
    message = _error(minimal, ["eval.every_steps=3"])
    assert "'eval.every_steps'" in message and "max_new_tokens" in message


def test_unknown_key_in_file_names_the_file(tmp_path, files):
    path = tmp_path / "typo.yaml"
    path.write_text(f"model: gemma3-270m\ndata: {{train: {files['train']}, pack: true}}\n"
                    f"output_dir: {files['out']}\n")
    message = _error(str(path))
    assert message.startswith(f"{path}: ") and "'data.pack'" in message and "packing" in message


@pytest.mark.parametrize("override, key, expected", [
    ("train.steps=ten", "train.steps", "an integer"),
    ("train.steps=1.5", "train.steps", "an integer"),
    ("train.learning_rate=fast", "train.learning_rate", "a number"),
    ("data.packing=maybe", "data.packing", "true or false"),
    ("train.batch_size=true", "train.batch_size", "an integer"),
    ("data.train=[a,b]", "data.train", "a string"),
    ("model=3", "model", "a string"),
    ("train=5", "train", "a section of keys"),
    ("method.r=abc", "method.r", "an integer"),
    ("method.targets=5", "method.targets", "a string or a list of strings"),
    ("method.layers_to_transform=[a]", "method.layers_to_transform", "a list of integers"),
])
def test_wrong_types(minimal, override, key, expected):
    message = _error(minimal, [override])
    assert key in message and expected in message
    assert repr(yaml.safe_load(override.split("=", 1)[1])) in message  # the value got


@pytest.mark.parametrize("override, key, valid", [
    ("train.optimizer=adam", "train.optimizer", "adamw, sgd, adafactor, lion"),
    ("train.schedule=exp", "train.schedule", "cosine, linear, constant"),
    ("data.format=json", "data.format", "text, prompt_completion, chat"),
    ("data.overlong=wrap", "data.overlong", "truncate, drop"),
    ("model_dtype=fp16", "model_dtype", "auto, float32, bfloat16, float16"),
    ("compute_dtype=int8", "compute_dtype", "auto, float32, bfloat16, float16"),
    ("remat=some", "remat", "none, full, dots, dots_no_batch"),
    ("kernels=fast", "kernels", "auto, pallas, xla"),
    ("objective=ppo", "objective", "dpo, grpo, ipo, kto, orpo, sft, simpo"),
    ("method.name=qlora", "method.name", "bitfit, full, hft, ia3, lisa, lora"),
])
def test_unknown_names_list_the_valid_ones(minimal, override, key, valid):
    message = _error(minimal, [override])
    assert key in message and valid in message


@pytest.mark.parametrize("overrides, key, words", [
    (["train.grad_accum=0"], "train.grad_accum", "at least 1"),
    (["train.steps=0"], "train.steps", "at least 1"),
    (["train.batch_size=-2"], "train.batch_size", "at least 1"),
    (["train.learning_rate=0"], "train.learning_rate", "greater than 0"),
    (["train.learning_rate=.nan"], "train.learning_rate", "finite"),
    (["train.weight_decay=.inf"], "train.weight_decay", "finite"),
    (["train.warmup_steps=200"], "train.warmup_steps", "train.steps (100)"),
    (["train.steps=10", "train.warmup_steps=11"], "train.warmup_steps", "train.steps (10)"),
    (["eval.generate=true"], "eval.generate", "data.eval"),
    (["eval.every=10"], "eval.every", "data.eval"),
    (["data.max_length=1"], "data.max_length", "data.packing"),
    (["checkpoint.keep=0"], "checkpoint.keep", "at least 1"),
    (["checkpoint.every=-1"], "checkpoint.every", "at least 0"),
    (["train.max_bad_steps=0"], "train.max_bad_steps", "at least 1"),
    (["train.min_lr_ratio=2"], "train.min_lr_ratio", "at most 1"),
    (["train.beta2=1.0"], "train.beta2", "less than 1"),
    (["train.momentum=0.9"], "train.momentum", "sgd"),
    (["train.optimizer=sgd", "train.beta1=0.9"], "train.beta1", "sgd"),
    (["eval.max_new_tokens=0"], "eval.max_new_tokens", "at least 1"),
    (["method.calibration_batches=0"], "method.calibration_batches", "at least 1"),
    (["method.layers_to_transform=[-1]"], "method.layers_to_transform", "at least 0"),
])
def test_impossible_values_and_combinations(minimal, overrides, key, words):
    message = _error(minimal, overrides)
    assert key in message and words in message


def test_packing_off_allows_max_length_1(minimal):
    assert load_config(minimal, ["data.packing=false", "data.max_length=1"]).data.max_length == 1


def test_required_keys(tmp_path, files):
    path = tmp_path / "partial.yaml"
    path.write_text(f"data: {{train: {files['train']}}}\noutput_dir: {files['out']}\n")
    assert "'model'" in _error(str(path)) and "missing" in _error(str(path))
    assert "'output_dir'" in _error(None, ["model=gemma3-270m", f"data.train={files['train']}"])
    assert "'data.train'" in _error(None, ["model=gemma3-270m", "data.format=text",
                                           f"output_dir={files['out']}"])
    assert "'data'" in _error(None, ["model=gemma3-270m", f"output_dir={files['out']}"])


def test_method_options_are_validated_by_make_config(minimal):
    message = _error(minimal, ["method.rank=4"])
    # make_config's own message (the valid options, `r` among them), prefixed with the key.
    assert "method.rank: unknown option 'rank' for method 'lora'; valid:" in message
    assert " r," in message and "alpha" in message and "layers_to_transform" in message
    message = _error(minimal, ["method.dropout=1.5"])
    assert "method.dropout" in message and "lora dropout must be in [0, 1)" in message
    message = _error(minimal, ["method.init=svd"])
    assert "method.init" in message and "pissa" in message
    message = _error(minimal, ["method.name=ia3", "method.r=4"])
    assert "method.r" in message and "'ia3'" in message and "feedforward" in message
    message = _error(minimal, ["method.name=full", "method.layers_to_transform=[0]"])
    assert "method" in message and "no targets" in message


def test_bad_overrides(minimal):
    assert "key.sub=value" in _error(minimal, ["train.steps"])
    assert "key.sub=value" in _error(minimal, ["=3"])
    assert "key.sub=value" in _error(minimal, ["train..steps=3"])
    message = _error(minimal, ["model.path=x"])
    assert "override 'model.path=x'" in message and "model" in message
    message = _error(minimal, ["train.steps=[1,"])
    assert "train.steps=[1," in message and "YAML" in message


def test_paths_are_checked(minimal, tmp_path, files):
    message = _error(minimal, ["data.train=/nonexistent/train.jsonl"])
    assert "data.train" in message and "/nonexistent/train.jsonl" in message
    message = _error(minimal, [f"data.eval={tmp_path / 'missing.jsonl'}"])
    assert "data.eval" in message
    message = _error(minimal, ["model=/nonexistent/model"])
    assert "model" in message and "smollm2-135m-instruct" in message
    weights = tmp_path / "model.bin"
    weights.write_text("x")
    assert ".gguf" in _error(minimal, [f"model={weights}"])
    (tmp_path / "model.gguf").write_text("x")
    (tmp_path / "hf").mkdir()
    assert load_config(minimal, [f"model={tmp_path / 'model.gguf'}"]).model.endswith(".gguf")
    assert load_config(minimal, [f"model={tmp_path / 'hf'}"]).model == str(tmp_path / "hf")
    assert "not a directory" in _error(minimal, [f"output_dir={weights}"])
    config = load_config(minimal, ["data.train=elsewhere.jsonl", "model=x"], check_paths=False)
    assert config.data.train == "elsewhere.jsonl"


# ---------------------------------------------------------------------------- fingerprint


def test_fingerprint(minimal, files):
    base = load_config(minimal, [])
    fingerprint = base.fingerprint()
    assert len(fingerprint) == 16 and fingerprint == load_config(minimal, []).fingerprint()
    same = [
        ["train.steps=5000"], ["checkpoint.every=10"], ["checkpoint.keep=1"],
        ["train.log_every=50"], ["train.max_bad_steps=2"], ["remat=full"],
        ["kernels=xla"], ["objective=sft"],
        [f"output_dir={files['out']}2"], [f"data.eval={files['eval']}", "eval.every=5"],
        ["method.r=8"], ["method.alpha=8"], ["method.targets=[q_proj,v_proj]"],
    ]
    for overrides in same:
        assert load_config(minimal, overrides).fingerprint() == fingerprint, overrides
    different = [
        ["model=smollm2-135m-instruct"], ["model_dtype=bfloat16"], ["compute_dtype=float32"],
        ["method.name=ia3"], ["method.r=16"], ["method.targets=all-linear"],
        ["method.calibration_batches=2"], [f"data.train={files['eval']}"], ["data.max_length=64"],
        ["data.packing=false"], ["data.format=chat"], ["train.learning_rate=1e-3"],
        ["train.batch_size=4"], ["train.grad_accum=2"], ["train.seed=1"],
        ["train.warmup_steps=10"], ["train.optimizer=lion"], ["train.schedule=constant"],
    ]
    seen = {fingerprint}
    for overrides in different:
        value = load_config(minimal, overrides).fingerprint()
        assert value not in seen, overrides
        seen.add(value)


# ---------------------------------------------------------------------------- optimizer


def _train(**kwargs) -> TrainSection:
    return TrainSection(**kwargs)


def test_schedules():
    train = _train(steps=100, warmup_steps=10, learning_rate=1e-3, schedule="cosine")
    lr = build_schedule(train)
    np.testing.assert_allclose([lr(0), lr(5), lr(10)], [0.0, 5e-4, 1e-3], rtol=1e-6)
    np.testing.assert_allclose(lr(55), 5e-4, rtol=1e-5)  # halfway through the cosine
    np.testing.assert_allclose(lr(100), 0.0, atol=1e-9)
    lr = build_schedule(_train(steps=100, warmup_steps=10, learning_rate=1e-3,
                               schedule="linear", min_lr_ratio=0.1))
    np.testing.assert_allclose([lr(10), lr(55), lr(100)], [1e-3, 5.5e-4, 1e-4], rtol=1e-5)
    lr = build_schedule(_train(steps=100, warmup_steps=4, learning_rate=2e-4,
                               schedule="constant"))
    np.testing.assert_allclose([lr(0), lr(2), lr(4), lr(100)], [0.0, 1e-4, 2e-4, 2e-4],
                               rtol=1e-6)
    lr = build_schedule(_train(steps=100, learning_rate=2e-4, schedule="cosine",
                               min_lr_ratio=0.5))
    np.testing.assert_allclose([lr(0), lr(100)], [2e-4, 1e-4], rtol=1e-6)  # no warmup
    lr = build_schedule(_train(steps=100, learning_rate=1e-3), total_steps=200)
    np.testing.assert_allclose(lr(100), 5e-4, rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adafactor", "lion"])
def test_each_optimizer_updates_a_pytree(optimizer):
    params = {"a": jnp.ones((4, 3)), "b": {"c": jnp.zeros((3,))}}
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
    extra = {"momentum": 0.9} if optimizer == "sgd" else {}
    train = _train(steps=10, learning_rate=1e-2, optimizer=optimizer, weight_decay=0.01,
                   **extra)
    tx = build_optimizer(train)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    new = optax.apply_updates(params, updates)
    assert jax.tree.structure(new) == jax.tree.structure(params)
    for before, after in zip(jax.tree.leaves(params), jax.tree.leaves(new), strict=True):
        assert after.shape == before.shape and bool(jnp.all(after < before))
        assert bool(jnp.all(jnp.isfinite(after)))


def test_grad_clip_and_accumulation():
    params = {"w": jnp.zeros((2,))}
    huge = {"w": jnp.array([3e3, 4e3])}
    clipped = build_optimizer(_train(learning_rate=1.0, optimizer="sgd", grad_clip=1.0,
                                     schedule="constant"))
    updates, _ = clipped.update(huge, clipped.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.6, -0.8], rtol=1e-6)
    unclipped = build_optimizer(_train(learning_rate=1.0, optimizer="sgd", grad_clip=0.0,
                                       schedule="constant"))
    updates, _ = unclipped.update(huge, unclipped.init(params), params)
    np.testing.assert_allclose(updates["w"], [-3e3, -4e3])

    tx = build_optimizer(_train(learning_rate=1.0, optimizer="sgd", grad_clip=0.0,
                                schedule="constant"))
    assert wrap_accumulation(tx, 1) is tx
    accumulated = wrap_accumulation(tx, 2)
    assert isinstance(accumulated, optax.MultiSteps)
    state = accumulated.init(params)
    updates, state = accumulated.update({"w": jnp.array([1.0, 0.0])}, state, params)
    np.testing.assert_allclose(updates["w"], [0.0, 0.0])  # first micro-batch: no update
    updates, state = accumulated.update({"w": jnp.array([3.0, 2.0])}, state, params)
    np.testing.assert_allclose(updates["w"], [-2.0, -1.0])  # the mean of the two
    with pytest.raises(JftError, match="train.grad_accum"):
        wrap_accumulation(tx, 0)


def test_config_dataclasses_are_frozen(minimal):
    config = load_config(minimal, [])
    assert isinstance(config, TrainConfig)
    with pytest.raises(AttributeError):
        config.train.steps = 5  # type: ignore[misc]
