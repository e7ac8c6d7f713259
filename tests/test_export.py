"""Merged export: every family, from GGUF (config.json written by jft) and from HF
directories (copied), with deltas of several methods folded in, loads in transformers
with the same logits; `python -m jft.export` end to end and its bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jft
from jft.api import Model
from jft.errors import JftError
from jft.export import FORMATS
from jft.formats.hf_export import write_hf_dir
from jft.peft import Adapter, create, get_method
from jft.peft.base import partition
from tests.gguf_writer import write_gguf
from tests.hf_reference import hf_logits, make_hf_model, save_hf_model
from tests.test_train_cli import ROOT, _config, _train, tiny_model  # noqa: F401

TOKENS = np.array([[1, 5, 9, 33, 70, 101, 7, 150, 3, 12]])


def _trained(method: str, model: Model, seed: int, **options) -> Model:
    """`model` with a `method` adapter whose trainable leaves are random (as after
    training), in the form that applies to the unmodified base."""
    base, adapter = create(method, jax.random.key(seed), model.params, model.config, **options)
    trainable, _ = partition([adapter])
    rng = np.random.default_rng(seed)
    noisy = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape), trainable[0].delta)
    delta = jax.tree.map(lambda t, x: x if t is None else t, noisy, adapter.delta,
                         is_leaf=lambda x: x is None)
    impl = get_method(method)
    delta, config = impl.split(delta, model.config, adapter.config)
    params = impl.rebase(model.params, delta, model.config, config)
    return Model(model.config, params, model.tokenizer, model.source,
                 [Adapter(jax.tree.map(jnp.asarray, delta), method, config)])


CASES = [  # family, method, options
    ("llama", "lora", dict(targets="all-linear", r=4, dora=True)),
    ("qwen2", "s2ft", dict(attention_ratio=0.5, mlp_ratio=0.25,
                           attention_modules=["q_proj", "v_proj", "o_proj"])),
    ("qwen3", "spiel", dict(density=0.05)),
    ("gemma", "ia3", dict(targets="all-linear")),
    ("gemma2", "full", {}),
    ("gemma3", "lora", dict(targets=["q_proj", "down_proj"], init="pissa", r=4)),
]


@pytest.mark.parametrize("family, method, options", CASES, ids=[c[0] for c in CASES])
def test_merged_gguf_model_loads_in_transformers_with_the_same_logits(
        family, method, options, tmp_path):
    import transformers

    gguf = write_gguf(make_hf_model(family), tmp_path / f"{family}.gguf", family)
    model = _trained(method, jft.load(gguf, dtype="float32", compute_dtype="float32"), 1,
                     **options)
    expected = np.asarray(model.logits(TOKENS))
    out = tmp_path / "merged"
    write_hf_dir(model, out, "fp32", max_shard_bytes=100_000)  # several shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    np.testing.assert_allclose(hf_logits(hf.float(), TOKENS), expected, atol=1e-4)


def test_merged_hf_dir_keeps_its_config_and_tokenizer_files(tmp_path):
    import transformers

    source = tmp_path / "source"
    save_hf_model("qwen2", source)
    (source / "tokenizer_config.json").write_text('{"model_max_length": 7}')
    model = _trained("lora", jft.load(source, dtype="float32", compute_dtype="float32"), 2,
                     targets="all-linear", r=4)
    out = tmp_path / "merged"
    write_hf_dir(model, out, "bf16")
    written = json.loads((out / "config.json").read_text())
    original = json.loads((source / "config.json").read_text())
    assert written == {**original, "dtype": "bfloat16", "torch_dtype": "bfloat16"}
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 7}'
    assert (out / "model.safetensors").is_file()  # small enough for one file
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert next(hf.parameters()).dtype.__str__() == "torch.bfloat16"
    expected = np.asarray(model.logits(TOKENS))
    # bf16 weights: the logits agree to bf16 precision of the merged weights.
    np.testing.assert_allclose(hf_logits(hf.float(), TOKENS), expected, atol=0.05)


def _export(*args):
    return subprocess.run([sys.executable, "-m", "jft.export", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


def test_cli_exports_a_run_merged_and_refuses_what_it_cannot(tiny_model, tmp_path):  # noqa: F811
    import transformers

    config = _config(tmp_path, tiny_model, eval={"every": 0}, **{
        "data.eval": None, "train.steps": 2})
    _train(config)
    run, out = tmp_path / "run", tmp_path / "merged"
    done = _export(run, "--out", out, "--format", "merged", "--dtype", "fp32")
    assert done.returncode == 0, done.stderr[-2000:]
    model = jft.load(tiny_model, dtype="float32", compute_dtype="float32", adapter=run)
    ids = model.tokenizer.encode("Rewrite the date 1969-07-20")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    np.testing.assert_allclose(hf_logits(hf, np.array([ids])), np.asarray(model.logits(ids)),
                               atol=1e-4)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("Rewrite the date")["input_ids"] == model.tokenizer.encode(
        "Rewrite the date")

    gguf = _export(run, "--out", tmp_path / "gguf", "--format", "gguf", "--quant", "f32")
    assert gguf.returncode == 0, gguf.stderr[-2000:]
    reloaded = jft.load(tmp_path / "gguf/model.gguf", dtype="float32", compute_dtype="float32")
    prompt = "Rewrite the date 1969-07-20 as DD/MM/YYYY. Answer:"
    assert reloaded.generate(prompt, max_new_tokens=6) == model.generate(prompt,
                                                                         max_new_tokens=6)

    for format in ("jft", "peft"):  # the adapter alone, loaded back over the same base
        done = _export(run, "--out", tmp_path / format, "--format", format)
        assert done.returncode == 0, done.stderr[-2000:]
        back = jft.load(tiny_model, dtype="float32", compute_dtype="float32",
                        adapter=tmp_path / format)
        np.testing.assert_allclose(np.asarray(back.logits(ids)), np.asarray(model.logits(ids)),
                                   atol=1e-5)
    remerged = _export("--adapter", tmp_path / "jft", "--out", tmp_path / "remerged",
                       "--format", "merged", "--dtype", "fp32")  # base from jft_adapter.json
    assert remerged.returncode == 0, remerged.stderr[-2000:]
    assert (tmp_path / "remerged/model.safetensors").read_bytes() == (
        out / "model.safetensors").read_bytes()

    one = _export(run / "checkpoints/2", "--out", tmp_path / "step2", "--format", "jft")
    assert one.returncode == 0, one.stderr[-2000:]  # a given checkpoint, here the latest
    assert (tmp_path / "step2/adapter.safetensors").read_bytes() == (
        tmp_path / "jft/adapter.safetensors").read_bytes()
    save_hf_model("llama", tmp_path / "other")
    with pytest.raises(JftError, match="made for a model with vocab_size=49152, this base "
                                       "has 160"):
        jft.load(tmp_path / "other", adapter=run)

    again = _export(run, "--out", out, "--format", "merged")
    assert again.returncode == 2
    assert again.stderr == f"error: {out} exists; choose another --out, or pass --overwrite " \
                           "to move it aside\n"
    replaced = _export(run, "--out", out, "--format", "merged", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert (tmp_path / "merged.old1" / "config.json").is_file()  # moved aside, not lost

    prompt = tmp_path / "prompt"
    _train(_config(prompt.parent, tiny_model, eval={"every": 0}, **{
        "data.eval": None, "train.steps": 1, "output_dir": str(prompt),
        "method": {"name": "prompt_tuning", "num_virtual_tokens": 2}}))
    refused = _export(prompt, "--out", tmp_path / "x", "--format", "merged")
    assert refused.returncode == 2
    assert refused.stderr == "error: --format merged cannot express prompt_tuning; " \
                             "prompt_tuning exports as peft or jft\n"
    assert not (tmp_path / "x").exists() and not Path(f"{tmp_path / 'x'}.partial").exists()


JFT_FORMAT_CASES = [
    ("s2ft", dict(attention_ratio=0.5, mlp_ratio=0.25)),
    ("spiel", dict(density=0.05)),
    ("lora", dict(targets="all-linear", r=4, init="pissa", rank_pattern={"q_proj": 2})),
    ("hft", {}),
    ("prefix_tuning", dict(num_virtual_tokens=3)),
]


@pytest.mark.parametrize("method, options", JFT_FORMAT_CASES, ids=[c[0] for c in JFT_FORMAT_CASES])
def test_jft_adapter_format_round_trips_over_the_unmodified_base(method, options, tmp_path):
    from jft.formats.adapters import load_adapter
    from jft.formats.jft_adapter import save_jft_adapter

    source = tmp_path / "source"
    save_hf_model("llama", source)
    base = jft.load(source, dtype="float32", compute_dtype="float32")
    model = _trained(method, base, 3, **options)
    save_jft_adapter(model.adapters[0], model.config, tmp_path, str(source))
    params, adapters = load_adapter(tmp_path, base.params, base.config)
    loaded = Model(base.config, params, base.tokenizer, base.source, adapters)
    np.testing.assert_allclose(np.asarray(loaded.logits(TOKENS)),
                               np.asarray(model.logits(TOKENS)), atol=1e-5)
    if method == "lora":  # PiSSA rewrote the base: loading rewrites it again, exactly
        assert not np.array_equal(np.asarray(params["layers"]["q_proj"]),
                                  np.asarray(base.params["layers"]["q_proj"]))


def test_jft_adapter_for_another_base_is_refused(tmp_path):
    from jft.formats.adapters import load_adapter
    from jft.formats.jft_adapter import save_jft_adapter

    source = tmp_path / "source"
    save_hf_model("llama", source)
    base = jft.load(source, dtype="float32", compute_dtype="float32")
    model = _trained("lora", base, 4, r=2)
    save_jft_adapter(model.adapters[0], model.config, tmp_path)
    other = base.config.replace(mlp_dim=base.config.mlp_dim * 2)
    with pytest.raises(JftError, match="made for a model with mlp_dim=96, this base has 192"):
        load_adapter(tmp_path, base.params, other)


# ---------------------------------------------------------------- reliability: paths, disk, modes


@pytest.fixture(scope="module")
def tiny_peft(tiny_model, tmp_path_factory):  # noqa: F811
    """A LoRA over `tiny_model` as a PEFT adapter directory that names its base by path."""
    from jft.formats.peft_adapter import save_peft_adapter

    model = jft.load(tiny_model, dtype="float32", compute_dtype="float32")
    adapter = _trained("lora", model, 5, targets="all-linear", r=4).adapters[0]
    directory = tmp_path_factory.mktemp("peft")
    save_peft_adapter(adapter, model.config, directory, str(tiny_model))
    return directory


def _export_in_process(capsys, *args) -> tuple[int, list[str]]:
    from jft.errors import run_cli
    from jft.export import main

    status = run_cli(main, [str(a) for a in args])
    return status, capsys.readouterr().err.splitlines()


def _tree(directory: Path) -> dict:
    return {str(p.relative_to(directory)): None if p.is_dir() else (p.stat().st_size,
                                                                     p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*"))}


def test_exported_files_follow_the_umask_and_the_base_comes_from_the_adapter(
        tiny_model, tiny_peft, tmp_path, capsys):  # noqa: F811
    previous = os.umask(0o022)
    try:
        for format in FORMATS:  # no --model: the adapter's base_model_name_or_path
            status, err = _export_in_process(capsys, "--adapter", tiny_peft, "--out",
                                             tmp_path / format, "--format", format)
            assert status == 0, err
    finally:
        os.umask(previous)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777
             for p in tmp_path.rglob("*")}
    assert {"merged/model.safetensors", "merged/tokenizer.json", "gguf/model.gguf",
            "peft/adapter_model.safetensors", "jft/adapter.safetensors"} <= set(modes)
    assert {name: mode for name, mode in modes.items()
            if mode != (0o755 if (tmp_path / name).is_dir() else 0o644)} == {}
    written = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == str(tiny_model)


def test_a_peft_adapters_base_is_a_path_or_a_bundled_hub_id(tiny_peft, tmp_path, capsys,
                                                            monkeypatch):
    loaded = []

    def load(name, **_):
        loaded.append(name)
        raise JftError("loaded")

    monkeypatch.setattr(jft, "load", load)
    config_path = tmp_path / "adapter/adapter_config.json"
    config_path.parent.mkdir()
    for base in ("HuggingFaceTB/SmolLM2-135M-Instruct", "someone/model", None):
        config = json.loads((tiny_peft / "adapter_config.json").read_text())
        config_path.write_text(json.dumps({**config, "base_model_name_or_path": base}))
        status, err = _export_in_process(capsys, "--adapter", config_path.parent, "--out",
                                         tmp_path / "out", "--format", "jft")
        assert status == 2 and len(err) == 1
        if base == "HuggingFaceTB/SmolLM2-135M-Instruct":
            assert loaded == ["smollm2-135m-instruct"] and err == ["error: loaded"]
        else:
            assert err[0] == (f"error: {config_path}: base_model_name_or_path {base!r} is "
                              "neither a local path nor a bundled model's id (HuggingFaceTB/"
                              "SmolLM2-135M-Instruct, google/gemma-3-270m); give --model")
    assert loaded == ["smollm2-135m-instruct"]


def test_bad_paths_are_refused_before_the_model_loads(tiny_peft, tmp_path, capsys,
                                                      monkeypatch):
    monkeypatch.setattr(jft, "load", lambda *_, **__: pytest.fail("loaded the model"))
    (tmp_path / "file").write_text("")
    cases = {
        ("--adapter", tiny_peft, "--out", "/proc/jft-test/out"):
            "--out /proc/jft-test/out: cannot create it (No such file or directory at "
            "/proc/jft-test)",
        ("--adapter", tiny_peft, "--out", tmp_path / "file/out"):
            f"--out {tmp_path}/file/out: cannot create it ({tmp_path}/file is a file, not a "
            "directory)",
        (tmp_path / "rnu", "--out", tmp_path / "out"):
            f"{tmp_path}/rnu: run directory does not exist; give a python -m jft.train run "
            "directory (or RUN/checkpoints/N), or --model and --adapter",
        ("--model", "m", "--adapter", tmp_path / "nope", "--out", tmp_path / "out"):
            f"--adapter {tmp_path}/nope: adapter does not exist; give a run directory, a PEFT "
            "adapter directory or a jft adapter directory",
    }
    for args, message in cases.items():
        assert _export_in_process(capsys, *args, "--format", "merged") == (
            2, [f"error: {message}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("format, left", [  # bytes left free: the tensors' write fails
    ("merged", 64 << 10), ("gguf", 2560 << 10), ("peft", 4 << 10), ("jft", 4 << 10)])
def test_a_full_disk_is_one_line_and_leaves_nothing(
        format, left, tiny_model, tiny_peft, tmp_path, capsys, monkeypatch):  # noqa: F811
    from jft import storage
    from tests.small_disk import small_disk

    with small_disk(tmp_path / "disk", "12m") as disk:
        out = disk / "out"
        out.mkdir()
        (out / "kept.txt").write_text("an earlier export")
        if format == "merged":  # the small files fit, the weights do not
            left += sum(f.stat().st_size + 4096 for f in tiny_model.iterdir()
                        if f.suffix != ".safetensors")
        (disk / "filler").write_bytes(b"\0" * (storage.free_bytes(disk) - left))
        before = _tree(disk)
        args = ("--adapter", tiny_peft, "--out", out, "--format", format, "--overwrite")
        status, err = _export_in_process(capsys, *args)
        assert status == 2 and len(err) == 1, err
        size = r"[\d.]+ (B|KiB|MiB)"
        line = rf"error: no space left on {disk} writing {out} \(needed about {size}%s\); " \
               "free some space or choose another directory"
        assert re.fullmatch(line % f", free {size}", err[0]), err[0]
        assert _tree(disk) == before
        # The estimate passed (a filesystem that reports no free space): the write fails.
        monkeypatch.setattr(storage, "free_bytes", lambda path: None)
        status, err = _export_in_process(capsys, *args)
        assert status == 2 and len(err) == 1, err
        assert re.fullmatch(line % "", err[0]), err[0]
        assert _tree(disk) == before
