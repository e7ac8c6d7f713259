"""Bad input gives one stderr line naming the file and the problem, and exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import jft
from jft.errors import JftError, run_cli
from jft.generate import main
from tests.hf_reference import save_hf_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    save_hf_model("llama", directory)
    return directory


def _run(capsys, model, *flags) -> str:
    status = run_cli(main, ["--model", str(model), "--prompt", "hi", *flags])
    captured = capsys.readouterr()
    assert status == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_path_names_the_path_and_the_valid_sources(capsys, tmp_path):
    line = _run(capsys, tmp_path / "nope")
    assert "nope" in line and "no such file" in line and "smollm2-135m-instruct" in line


def test_truncated_safetensors_names_the_file(capsys, hf_dir, tmp_path):
    broken = _copy(hf_dir, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    line = _run(capsys, broken)
    assert str(weights) in line and "truncated" in line


def test_corrupt_safetensors_header_names_the_file(capsys, hf_dir, tmp_path):
    broken = _copy(hf_dir, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    line = _run(capsys, broken)
    assert str(weights) in line and "header" in line


def test_corrupt_gguf_names_the_file(capsys, tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"GGUF" + b"\xff" * 200)
    line = _run(capsys, bogus)
    assert str(bogus) in line and "not a valid GGUF" in line


def test_unsupported_architecture_lists_supported_ones(capsys, hf_dir, tmp_path):
    other = _copy(hf_dir, tmp_path / "gpt2")
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "gpt2"
    (other / "config.json").write_text(json.dumps(config))
    line = _run(capsys, other)
    assert "config.json" in line and "'gpt2'" in line and "llama" in line and "gemma3" in line


def test_config_missing_a_field_names_the_field(capsys, hf_dir, tmp_path):
    other = _copy(hf_dir, tmp_path / "partial")
    config = json.loads((other / "config.json").read_text())
    del config["hidden_size"]
    (other / "config.json").write_text(json.dumps(config))
    line = _run(capsys, other)
    assert "config.json" in line and "'hidden_size'" in line


def test_pickle_checkpoints_are_refused_without_being_opened(capsys, tmp_path):
    directory = tmp_path / "pickled"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    # Not a valid pickle either: the point is that it is never read.
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    assert "pickle" in _run(capsys, directory)
    assert "pickle" in _run(capsys, directory / "pytorch_model.bin")


def test_invalid_flag_values_are_one_line(capsys, hf_dir):
    assert "temperature" in _run(capsys, hf_dir, "--temperature", "-1")
    assert "--max-new-tokens" in _run(capsys, hf_dir, "--max-new-tokens", "zero")


def test_cli_process_exits_2_without_traceback_and_debug_shows_it(tmp_path):
    missing = str(tmp_path / "x")
    command = [sys.executable, "-m", "jft.generate", "--model", missing, "--prompt", "a"]
    plain = subprocess.run(command, capture_output=True, text=True)
    assert plain.returncode == 2 and plain.stdout == ""
    assert "Traceback" not in plain.stderr and "no such file" in plain.stderr
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.fixture(scope="module")
def adapters(hf_dir, tmp_path_factory):
    """A LoRA over `hf_dir` saved as a PEFT adapter (root/peft) and a jft one (root/jft)."""
    import jax

    import jft
    from jft.formats.jft_adapter import save_jft_adapter
    from jft.formats.peft_adapter import save_peft_adapter
    from jft.peft import create

    model = jft.load(hf_dir, dtype="float32")
    _, adapter = create("lora", jax.random.key(0), model.params, model.config, r=2)
    root = tmp_path_factory.mktemp("adapters")
    save_peft_adapter(adapter, model.config, root / "peft", str(hf_dir))
    (root / "jft").mkdir()
    save_jft_adapter(adapter, model.config, root / "jft", str(hf_dir))
    return root


def _truncated(data: bytes) -> bytes:
    return data[:-100]


def _bad_header(data: bytes) -> bytes:
    return b"\xff" * 8 + data[8:]


@pytest.mark.parametrize("kind, name, corrupt, problem", [
    ("peft", "adapter_model.safetensors", _truncated, "file is truncated"),
    ("peft", "adapter_model.safetensors", _bad_header, "corrupt safetensors header"),
    ("peft", "adapter_config.json", lambda _: b"[1, 2]",
     "not a PEFT adapter config (a JSON list, where an object of options belongs)"),
    ("peft", "adapter_config.json", lambda _: b"{", "unreadable PEFT adapter config"),
    ("jft", "adapter.safetensors", _truncated, "file is truncated"),
    ("jft", "jft_adapter.json", lambda _: b"[]",
     "not a jft adapter config (a JSON list, where an object of options belongs)"),
    ("jft", "jft_adapter.json", lambda data: data[:10], "unreadable jft adapter config"),
], ids=["peft-truncated", "peft-bad-header", "peft-config-list", "peft-config-not-json",
        "jft-truncated", "jft-config-list", "jft-config-not-json"])
def test_a_broken_adapter_file_is_named_by_generate_and_export(
        kind, name, corrupt, problem, capsys, hf_dir, adapters, tmp_path):
    from jft.export import main as export

    broken = _copy(adapters / kind, tmp_path / kind)
    (broken / name).write_bytes(corrupt((broken / name).read_bytes()))
    line = _run(capsys, hf_dir, "--adapter", str(broken))
    assert line.startswith(f"error: {broken / name}: {problem}"), line
    status = run_cli(export, ["--model", str(hf_dir), "--adapter", str(broken), "--out",
                              str(tmp_path / "out"), "--format", "merged"])
    assert (status, capsys.readouterr().err) == (2, line + "\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [kind]


def test_a_missing_adapter_says_it_does_not_exist(capsys, hf_dir, tmp_path):
    assert _run(capsys, hf_dir, "--adapter", str(tmp_path / "nope")) == (
        f"error: --adapter {tmp_path / 'nope'}: adapter does not exist; give a run directory, "
        "a PEFT adapter directory or a jft adapter directory")
    with pytest.raises(JftError, match=f"^{tmp_path / 'nope'}: adapter does not exist"):
        jft.load(hf_dir, adapter=tmp_path / "nope")
