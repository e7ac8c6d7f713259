"""`python -m jft.train` end to end on CPU: outputs, console, exact resume after kill -9,
bad input."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import yaml

import jft
from tests.hf_reference import save_tiny_smollm2

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random Llama with SmolLM2's real tokenizer (so data and chat templates are
    real), small enough that a training step takes milliseconds."""
    return save_tiny_smollm2(tmp_path_factory.mktemp("tiny"))


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


def _train_on_terminal(config: Path) -> str:
    """Runs the CLI with stdout and stderr on a pseudo-terminal 120 columns wide (tqdm draws
    nothing on one of zero columns); what it left on screen, each line as the last carriage
    return of the bar's redraws left it."""
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen([sys.executable, "-m", "jft.train", str(config)], cwd=ROOT,
                               stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    shown = b""
    while select.select([leader], [], [], 300)[0]:
        try:
            chunk = os.read(leader, 1 << 16)
        except OSError:  # EIO: the process has closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    lines = shown.decode(errors="replace").replace("\r\n", "\n").split("\n")
    text = "\n".join(line.rsplit("\r", 1)[-1] for line in lines)
    assert process.wait(timeout=60) == 0, text[-3000:]
    return text


@pytest.fixture(scope="module")
def terminal_run(tiny_model, tmp_path_factory) -> tuple[Path, str]:
    """One 8-step run with evaluation at steps 0, 4 and 8, trained on a terminal: (its
    directory, what it showed)."""
    directory = tmp_path_factory.mktemp("terminal")
    shown = _train_on_terminal(_config(directory, tiny_model))
    return directory / "run", shown


def test_cli_trains_and_writes_every_output(tiny_model, terminal_run):
    run, _ = terminal_run
    records = _metrics(run)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all({"step", "loss", "learning_rate", "grad_norm"} <= set(r) for r in records)
    assert {"eval_loss", "eval_perplexity", "eval_exact_match"} <= set(records[3])
    assert "tokens_per_s" in records[1]
    assert records[-1]["loss"] < records[0]["loss"]
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert any((run / "tensorboard").iterdir())
    assert (run / "eval_generations.jsonl").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 8
    model = jft.load(tiny_model, adapter=run)  # the adapter in use
    assert model.adapters and model.adapters[0].method == "lora"
    assert isinstance(model.generate("Rewrite the date 2001-02-03 as DD/MM/YYYY. Answer:",
                                     max_new_tokens=3), str)


def test_terminal_shows_timed_status_lines_a_progress_bar_and_a_summary(tiny_model,
                                                                         terminal_run):
    run, shown = terminal_run
    for doing in ("loading model", "reading and tokenizing data", "creating the lora adapter",
                  "evaluating before training", "compiling the training step"):
        assert re.search(rf"^{doing}[^\n]* \.\.\. \d+\.\d s$", shown, re.M), doing
    assert re.search(r"\| 8/8 \[[^\]]*(step/s|s/step), loss=", shown)  # the bar, at its end
    assert re.search(r"^before training: eval_loss=", shown, re.M)
    assert re.search(r"^step 4: loss=.*eval_exact_match=", shown, re.M)  # above the bar
    summary = shown[shown.index("done: step 8 of 8 in "):]
    assert "tokens/s while training" in summary.splitlines()[0]
    assert re.search(r"^  eval_loss +\S+ before training -> \S+$", summary, re.M)
    assert re.search(rf"^  adapter +{run}/checkpoints/8$", summary, re.M)
    for name in ("metrics.jsonl", "loss_curve.png", "tensorboard", "eval_generations.jsonl"):
        assert f" {run / name}\n" in summary, name
    first = json.loads((ROOT / "examples/quickstart/eval.jsonl").read_text().splitlines()[0])
    assert (f"generate with: python -m jft.generate --model {tiny_model} --adapter {run} "
            f"--prompt '{first['prompt']}'") in summary


def test_eval_generations_hold_each_answer_and_agree_with_exact_match(terminal_run):
    run, _ = terminal_run
    rows = [json.loads(line) for line in (run / "eval_generations.jsonl").read_text()
            .splitlines()]
    examples = [json.loads(line) for line in (ROOT / "examples/quickstart/eval.jsonl")
                .read_text().splitlines()[:4]]
    assert [row["step"] for row in rows] == [0] * 4 + [4] * 4 + [8] * 4
    assert all(set(row) == {"step", "prompt", "reference", "generated", "match"} for row in rows)
    assert [(row["prompt"], row["reference"]) for row in rows[:4]] == [
        (e["prompt"], e["completion"]) for e in examples]
    assert all(row["match"] == (row["generated"].strip() == row["reference"].strip())
               for row in rows)
    scores = {0: json.loads((run / "eval_before.json").read_text())["eval_exact_match"]}
    scores |= {r["step"]: r["eval_exact_match"] for r in _metrics(run) if "eval_exact_match" in r}
    for step, score in scores.items():
        matches = [row["match"] for row in rows if row["step"] == step]
        assert sum(matches) / len(matches) == score


def test_loss_curve_starts_at_the_before_training_eval(terminal_run):
    from jft.training.outputs import loss_curve_series

    run, _ = terminal_run
    before = json.loads((run / "eval_before.json").read_text())["eval_loss"]
    evals = [(r["step"], r["eval_loss"]) for r in _metrics(run) if "eval_loss" in r]
    series = loss_curve_series(run)
    assert series["eval loss"] == [(0, before), *evals]
    assert [step for step, _ in series["train loss"]] == list(range(1, 9))


def test_help_lists_debug_and_generate_help_shows_the_defaults():
    from jft.export import build_parser as export_parser
    from jft.generate import build_parser as generate_parser
    from jft.train import build_parser as train_parser

    assert "--debug" in train_parser().format_help()
    assert "--debug" in export_parser().format_help()
    shown = " ".join(generate_parser().format_help().split())
    assert "--debug" in shown and "(default: 128)" in shown and "(default: 0.0)" in shown


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
    checkpoints = killed / "run" / "checkpoints"
    saved = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    out = _train(config)  # resumes from the last checkpoint
    assert f"warning: {killed / 'run'}: taking over the lock of process {process.pid}" in out.stderr
    assert f"resuming from step {saved} (checkpoint {checkpoints / str(saved)}) ... " in out.stderr
    # Off a terminal, one plain line per logged step, from the first one after the checkpoint.
    assert re.search(rf"^step {saved + 1}: loss=", out.stdout, re.M)
    assert f"step {saved}:" not in out.stdout and "done: step 10 of 10" in out.stdout
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
    *status, error = out.stderr.strip().splitlines()  # status lines up to the data, then it
    assert error.startswith("error: ") and message in error
    assert status and all(" ... " in line or line.endswith(" ...") for line in status)


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
