"""Bad input gives one stderr line naming the file and the problem, and exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from jft.errors import run_cli
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
