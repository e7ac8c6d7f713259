"""The run directory: one run at a time (its lock), nothing written before the input is
validated, a full disk and a damaged checkpoint as one line, earlier checkpoints kept."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jft.errors import JftError, run_cli
from jft.train import fine_tune
from jft.training.run_dir import LOCK_FILE, RunDirectory
from tests.hf_reference import save_tiny_smollm2
from tests.small_disk import small_disk

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "examples/quickstart/train.jsonl")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_smollm2(tmp_path_factory.mktemp("tiny"))


def _config(tmp_path: Path, model: Path, output_dir: Path, **changes) -> Path:
    config = {
        "model": str(model),
        "method": {"name": "lora", "r": 2, "targets": ["q_proj", "v_proj"]},
        "data": {"train": TRAIN, "format": "prompt_completion", "max_length": 32},
        "train": {"steps": 4, "batch_size": 2, "log_every": 1},
        "checkpoint": {"every": 2, "keep": 3},
        "output_dir": str(output_dir),
    }
    for dotted, value in changes.items():
        section, _, key = dotted.partition(".")
        config[section][key] = value
    path = tmp_path / f"config{len(list(tmp_path.glob('config*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _train(*argv) -> int:
    """`python -m jft.train CONFIG [overrides]` in this process (JAX's runtime can only be
    initialised once per process, so not through `jft.train.main`)."""
    return run_cli(lambda args: fine_tune(args[0], args[1:]) and 0, [str(a) for a in argv])


def _fails(capsys, *argv) -> str:
    """The one error line of a `jft.train` that must refuse its input."""
    status = _train(*argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err and "ERROR:" not in err, err
    *_, last = err.strip().splitlines()
    assert last.startswith("error: "), err
    return last


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else b""
            for p in sorted(directory.rglob("*"))}


# ------------------------------------------------------------------ the lock, directly


def test_a_held_directory_is_refused_naming_its_holder(tmp_path):
    first = RunDirectory(tmp_path / "run", "aaaa", overwrite=False)
    with pytest.raises(JftError) as refused:
        RunDirectory(tmp_path / "run", "aaaa", overwrite=False)
    message = str(refused.value)
    assert f"process {os.getpid()} on {socket.gethostname()}" in message
    assert "in use" in message and str(tmp_path / "run") in message
    first.commit({"model": "m"})
    first.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    second = RunDirectory(tmp_path / "run", "aaaa", overwrite=False)
    assert second.resuming
    second.release()


def test_the_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(json.dumps({"pid": int(gone.stdout), "host":
                                             socket.gethostname(), "since": "earlier"}))
    with pytest.warns(UserWarning, match=f"taking over the lock of process {gone.stdout.strip()}"):
        claim = RunDirectory(run, "aaaa", overwrite=False)
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    claim.release()


def test_an_uncommitted_claim_leaves_no_directory_behind(tmp_path):
    claim = RunDirectory(tmp_path / "a" / "run", "aaaa", overwrite=False)
    assert (tmp_path / "a" / "run" / LOCK_FILE).exists()
    claim.release()
    assert not (tmp_path / "a" / "run").exists()


def test_another_configs_run_without_checkpoint_is_reused(tmp_path):
    run = tmp_path / "run"
    claim = RunDirectory(run, "aaaa", overwrite=False)
    claim.commit({"model": "m"})
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    claim.release()
    retry = RunDirectory(run, "bbbb", overwrite=False)
    assert not retry.resuming
    retry.commit({"model": "m"})
    retry.release()
    assert yaml.safe_load((run / "config.yaml").read_text())["fingerprint"] == "bbbb"
    # What the failed run logged is kept aside, not lost.
    assert (tmp_path / "run.old1" / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_another_configs_run_with_a_checkpoint_is_refused_and_moved_aside_on_overwrite(
        tmp_path):
    run = tmp_path / "run"
    claim = RunDirectory(run, "aaaa", overwrite=False)
    claim.commit({"model": "m"})
    (run / "checkpoints" / "2").mkdir(parents=True)
    claim.release()
    with pytest.raises(JftError, match="another config .*--overwrite"):
        RunDirectory(run, "bbbb", overwrite=False)
    assert (run / "checkpoints" / "2").is_dir() and not (run / LOCK_FILE).exists()
    fresh = RunDirectory(run, "bbbb", overwrite=True)
    fresh.commit({"model": "m"})
    assert (tmp_path / "run.old1" / "checkpoints" / "2").is_dir()
    assert (run / LOCK_FILE).exists() and not (run / "checkpoints").exists()
    fresh.release()


# ------------------------------------------------------------------ jft.train


@pytest.mark.parametrize("where, reason", [
    ("/proc/jft-test/run", "No such file or directory"),
    ("{tmp}/config0.yaml/run", "is a file, not a directory"),
])
def test_an_output_dir_that_cannot_be_created_is_one_line(capsys, tiny_model, tmp_path,
                                                          where, reason):
    config = _config(tmp_path, tiny_model, tmp_path / "unused")
    line = _fails(capsys, config, f"output_dir={where.format(tmp=tmp_path)}")
    assert "output_dir" in line and "cannot create it" in line and reason in line


def test_a_failed_run_leaves_no_trace_and_the_corrected_retry_runs(capsys, tiny_model,
                                                                   tmp_path):
    run = tmp_path / "run"
    bad_targets = _config(tmp_path, tiny_model, run, **{"method.targets": ["qkv"]})
    line = _fails(capsys, bad_targets)
    assert str(bad_targets) in line and "method.targets" in line and "'qkv'" in line
    assert not run.exists()
    bad_eval = tmp_path / "eval.jsonl"
    bad_eval.write_text('{"prompt": "a"}\n')
    line = _fails(capsys, _config(tmp_path, tiny_model, run, **{"data.eval": str(bad_eval)}),
                  "eval.every=2")
    assert str(bad_eval) in line and not run.exists()
    # A run that died before its first checkpoint does not block another config either.
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"fingerprint": "from-a-failed-run"}))
    assert _train(_config(tmp_path, tiny_model, run)) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]
    assert not (run / LOCK_FILE).exists()


def test_a_full_disk_is_one_line_and_keeps_the_earlier_checkpoints(capsys, tiny_model,
                                                                   tmp_path):
    with small_disk(tmp_path / "disk", "256k") as disk:
        run = disk / "run"
        config = _config(tmp_path, tiny_model, run, **{"train.steps": 12})
        line = _fails(capsys, config)
        assert f"no space left on {disk} writing {run / 'checkpoints'}" in line
        assert "needed about" in line and "free" in line
        kept = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert kept and all(name.isdigit() for name in kept), kept  # no half-written one
        assert not (run / LOCK_FILE).exists()


def test_a_damaged_checkpoint_is_one_line_naming_it(capsys, tiny_model, tmp_path):
    run = tmp_path / "run"
    config = _config(tmp_path, tiny_model, run)
    assert _train(config) == 0
    for chunk in (run / "checkpoints" / "4" / "state").rglob("d/*"):
        chunk.write_bytes(b"\0" * 7)
    before = _snapshot(run)
    line = _fails(capsys, config, "train.steps=6")
    assert f"{run / 'checkpoints' / '4'}: checkpoint data is damaged" in line
    assert "delete it to resume from checkpoint 2" in line
    assert _snapshot(run) == before
    # Damaged metadata, read as an adapter: TensorStore's leftover callbacks print nothing.
    (run / "checkpoints" / "4" / "state" / "manifest.ocdbt").write_bytes(b"\0" * 20)
    out = subprocess.run([sys.executable, "-m", "jft.generate", "--model", str(tiny_model),
                          "--adapter", str(run), "--prompt", "hi"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"error: {run / 'checkpoints' / '4'}: checkpoint data is "
                                 "damaged") and out.stderr.count("\n") == 1, out.stderr


def test_two_runs_in_one_directory_give_one_run_and_one_refusal(tiny_model, tmp_path):
    run = tmp_path / "run"
    config = _config(tmp_path, tiny_model, run, **{"train.steps": 400, "checkpoint.every": 0})
    first = subprocess.Popen([sys.executable, "-m", "jft.train", str(config)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert time.time() < deadline and first.poll() is None, first.stderr.read()
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-m", "jft.train", str(config)], cwd=ROOT,
                            capture_output=True, text=True)
    assert second.returncode == 2 and second.stdout == ""
    assert second.stderr.strip() == (
        f"error: {run}: output_dir is in use by process {first.pid} on "
        f"{socket.gethostname()} (since {json.loads((run / LOCK_FILE).read_text())['since']});"
        " wait for that run to end, or choose another output_dir")
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))
    assert not (run / LOCK_FILE).exists()
