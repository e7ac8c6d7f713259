"""`python -m jft.train` end to end on CPU: outputs, exact resume after kill -9, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import jft

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random Llama with SmolLM2's real tokenizer (so data and chat templates are
    real), small enough that a training step takes milliseconds."""
    import transformers

    from jft.bundled import bundled_path

    directory = tmp_path_factory.mktemp("tiny")
    gguf = bundled_path("smollm2-135m-instruct")
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(directory)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def _config(tmp_path, model, **changes) -> Path:
    config = {
        "model": str(model),
        "method": {"name": "lora", "r": 4, "alpha": 8, "targets": "all-linear"},
        "data": {"train": str(ROOT / "examples/quickstart/train.jsonl"),
                 "eval": str(ROOT / "examples/quickstart/eval.jsonl"),
                 "format": "prompt_completion", "max_length": 64},
        "train": {"steps": 8, "batch_size": 4, "learning_rate": 5e-3, "log_every": 1},
        "eval": {"every": 4, "generate": True, "max_new_tokens": 4, "max_examples": 4},
        "checkpoint": {"every": 2, "keep": 2},
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if name:
            config[section][name] = value
        else:
            config[section] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _train(config: Path, *extra, check=True):
    out = subprocess.run([sys.executable, "-m", "jft.train", str(config), *extra],
                         capture_output=True, text=True, cwd=ROOT)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_cli_trains_and_writes_every_output(tiny_model, tmp_path):
    _train(_config(tmp_path, tiny_model))
    run = tmp_path / "run"
    records = _metrics(run)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all({"step", "loss", "learning_rate", "grad_norm"} <= set(r) for r in records)
    assert {"eval_loss", "eval_perplexity", "eval_exact_match"} <= set(records[3])
    assert "tokens_per_s" in records[1]
    assert records[-1]["loss"] < records[0]["loss"]
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert any((run / "tensorboard").iterdir())
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 8
    model = jft.load(tiny_model, adapter=run)  # the adapter in use
    assert model.adapters and model.adapters[0].method == "lora"
    assert isinstance(model.generate("Rewrite the date 2001-02-03 as DD/MM/YYYY. Answer:",
                                     max_new_tokens=3), str)


@pytest.mark.parametrize("method", [
    {"name": "s2ft", "attention_ratio": 0.5, "mlp_ratio": 0.1,
     "attention_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    {"name": "spiel", "density": 0.005, "reselection_steps": 2},
    # HFT switches its trained half through the same refresh path as LISA
    # (tests/test_peft_lisa_hft.py covers its selection).
    {"name": "lisa", "activated_layers": 1, "interval_steps": 2},
], ids=lambda m: m["name"])
def test_sparse_and_layer_methods_train_from_the_cli(tiny_model, tmp_path, method):
    _train(_config(tmp_path, tiny_model, method=method,
                   **{"train.steps": 6, "eval.every": 0, "checkpoint.every": 0}))
    records = _metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert records[-1]["loss"] < records[0]["loss"]
    model = jft.load(tiny_model, adapter=tmp_path / "run")
    assert model.adapters[0].method == method["name"]
    assert isinstance(model.generate("Rewrite the date 2001-02-03 as DD/MM/YYYY. Answer:",
                                     max_new_tokens=3), str)


def test_resume_after_kill_9_logs_the_same_losses(tiny_model, tmp_path):
    straight = tmp_path / "straight"
    straight.mkdir()
    _train(_config(straight, tiny_model, **{"train.steps": 10}))
    expected = [r["loss"] for r in _metrics(straight / "run")]

    killed = tmp_path / "killed"
    killed.mkdir()
    config = _config(killed, tiny_model, **{"train.steps": 10})
    process = subprocess.Popen([sys.executable, "-m", "jft.train", str(config)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    logged = len(metrics.read_text().splitlines())
    assert 5 <= logged < 10, "the run was not interrupted mid-way"
    _train(config)  # resumes from the last checkpoint
    resumed = _metrics(killed / "run")
    assert [r["step"] for r in resumed] == list(range(1, 11))
    assert [r["loss"] for r in resumed] == expected


def test_output_dir_of_another_config_is_refused_and_kept(tiny_model, tmp_path):
    _train(_config(tmp_path, tiny_model, **{"train.steps": 2, "eval.every": 0}))
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    other = _config(tmp_path, tiny_model, **{"train.steps": 2, "eval.every": 0,
                                             "train.learning_rate": 1e-4})
    out = _train(other, check=False)
    assert out.returncode == 2 and "another config" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    _train(other, "--overwrite")
    assert (tmp_path / "run.old1" / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": \n', "line 2"),
    ('{"prompt": "a"}\n', '"completion"'),
    ("", "empty"),
])
def test_bad_data_files_are_one_line_errors(tiny_model, tmp_path, content, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    out = _train(_config(tmp_path, tiny_model, **{"data.train": str(data)}), check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tiny_model, tmp_path):
    config = _config(tmp_path, tiny_model, **{"train.steps": 400, "eval.every": 0,
                                              "checkpoint.every": 0})
    process = subprocess.Popen([sys.executable, "-m", "jft.train", str(config)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if metrics.exists() and metrics.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0 and "stopped by signal" in stderr
    saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert saved and 3 <= saved[-1] < 400
    assert _metrics(tmp_path / "run")[-1]["step"] == saved[-1]
