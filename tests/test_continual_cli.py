"""`python -m jft.continual` end to end on CPU: every strategy runs a two-task sequence
and writes its results; a run killed with kill -9 between tasks and mid-task resumes to
exactly the uninterrupted run; the run loads for inference; bad configs are one line;
and the ConPET selector routes the shipped tasks' held-out prompts to their tasks."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from jft.errors import run_cli
from tests.hf_reference import save_tiny_smollm2

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "continual"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer, two small date tasks and a general
    text file."""
    directory = tmp_path_factory.mktemp("continual")
    save_tiny_smollm2(directory / "tiny")
    rng = random.Random(0)
    for name, form in (("dmy", "{d:02d}/{m:02d}/{y}"), ("ymd", "{y}{m:02d}{d:02d}")):
        (directory / name).mkdir()
        for split, count in (("train", 40), ("eval", 4)):
            with open(directory / name / f"{split}.jsonl", "w") as file:
                for _ in range(count):
                    y, m, d = rng.randint(1950, 2040), rng.randint(1, 12), rng.randint(1, 28)
                    file.write(json.dumps({
                        "prompt": f"Rewrite {y}-{m:02d}-{d:02d} as {name}:",
                        "completion": " " + form.format(y=y, m=m, d=d)}) + "\n")
    with open(directory / "general.jsonl", "w") as file:
        for i in range(6):
            file.write(json.dumps({"text": f"River {i} runs to the sea past old towns."}) + "\n")
    return directory


def _config(setup: Path, out: Path, strategy="sequential", method=None, steps=4, **options):
    config = {
        "model": str(setup / "tiny"),
        "method": method or {"name": "lora", "r": 4, "alpha": 8, "targets": "all-linear"},
        "data": {"format": "prompt_completion", "max_length": 48},
        "train": {"steps": steps, "batch_size": 4, "learning_rate": 5e-3},
        "eval": {"max_new_tokens": 4},
        "checkpoint": {"every": 2, "keep": 2},
        "tasks": [{"name": n, "train": str(setup / n / "train.jsonl"),
                   "eval": str(setup / n / "eval.jsonl")} for n in ("dmy", "ymd")],
        "general": str(setup / "general.jsonl"),
        "continual": {"strategy": strategy, **options},
        "output_dir": str(out / "run"),
    }
    path = out / "config.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def _continual(*args, check=True):
    out = subprocess.run([sys.executable, "-m", "jft.continual", *map(str, args)],
                         capture_output=True, text=True, cwd=ROOT)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def _in_process(capsys, *args) -> tuple[int, str, str]:
    """The CLI run in this process (no interpreter start-up and imports per run)."""
    from jft.continual.__main__ import main

    code = run_cli(main, [str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _results(run: Path) -> dict:
    return json.loads((run / "continual.json").read_text())


STRATEGIES = [
    ("sequential", None, {}),
    ("sequential", None, {"merge_between_tasks": True}),
    ("replay", None, {"buffer": "per_task", "per_task": 5}),
    ("gere", None, {"weight": 100.0}),
    ("olora", None, {}),
    ("osf", {"name": "osf"}, {}),
    ("hft", {"name": "hft"}, {}),
    ("conpet", None, {"mode": "static"}),
    ("conpet", None, {"mode": "dynamic"}),
]


def test_every_strategy_runs_and_writes_its_results(setup, tmp_path, capsys):
    import jft

    for i, (strategy, method, options) in enumerate(STRATEGIES):
        out = tmp_path / f"{i}-{strategy}"
        code, _, err = _in_process(capsys, _config(setup, out, strategy, method, steps=2,
                                                   **options))
        assert code == 0, err[-3000:]
        run = out / "run"
        results = _results(run)
        assert results["tasks"] == ["dmy", "ymd"] and results["strategy"] == strategy
        assert len(results["matrix"]) == 2 and len(results["general_ppl"]) == 3
        assert all(np.isfinite(results["general_ppl"])) and results["bwt"] is not None
        for name in ("heatmap.png", "general_ppl.png", "initial.json"):
            assert (run / name).exists(), (strategy, name)
        for stage in ("01-dmy", "02-ymd"):
            stage_dir = run / "stages" / stage
            assert (stage_dir / "adapter" / "jft_adapter.json").exists()
            assert len((stage_dir / "metrics.jsonl").read_text().splitlines()) == 2
            assert any((stage_dir / "tensorboard").iterdir())
        if options.get("mode") == "dynamic":
            assert all("selector_accuracy" in s for s in results["stages"])
            assert (run / "selector.safetensors").exists()
            from jft.generate import main as generate

            code = run_cli(generate, ["--model", str(setup / "tiny"), "--continual", str(run),
                                      "--prompt", "Rewrite 2001-02-03 as ymd:",
                                      "--max-new-tokens", "2"])
            captured = capsys.readouterr()
            assert code == 0 and captured.out.endswith("\n"), captured.err
            code = run_cli(generate, ["--model", str(setup / "tiny"), "--continual",
                                      str(setup), "--prompt", "x"])
            assert code == 2 and "continual.json" in capsys.readouterr().err
        if strategy in ("olora", "osf") or options.get("mode") == "dynamic":
            # Resuming between tasks rebuilds what the second stage starts from (the stack,
            # the merged base, the experts and selector) from the first: the same result.
            shutil.rmtree(run / "stages" / "02-ymd")
            code, _, err = _in_process(capsys, out / "config.yaml")
            assert code == 0, err[-3000:]
            again = _results(run)
            assert (again["matrix"], again["general_ppl"]) == (results["matrix"],
                                                               results["general_ppl"])
        # The run loads for inference, whatever its strategy.
        model = jft.load(setup / "tiny", adapter=run)
        assert isinstance(model.generate("Rewrite 2001-02-03 as dmy:", max_new_tokens=2), str)
    runs = [tmp_path / d / "run" for d in sorted(os.listdir(tmp_path))]
    code, table, _ = _in_process(capsys, "compare", *runs)
    assert code == 0 and table.count("\n") == len(STRATEGIES) + 2
    assert f"| {runs[4]} | olora | lora |" in table


def _wait_for(check, process, what):
    deadline = time.time() + 300
    while time.time() < deadline:
        if check():
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended before {what}")
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def test_kill_9_between_tasks_and_mid_task_resumes_to_the_uninterrupted_run(setup, tmp_path):
    straight = tmp_path / "straight"
    _continual(_config(setup, straight, "replay", steps=6))
    expected = _results(straight / "run")

    killed = tmp_path / "killed"
    config = _config(setup, killed, "replay", steps=6)
    run = killed / "run"
    second = run / "stages" / "02-ymd"
    command = [sys.executable, "-m", "jft.continual", str(config)]
    # 1: between the tasks (the second stage's directory is made, its training not begun).
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    _wait_for(second.exists, process, "the second stage")
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (second / "evaluation.json").exists()
    # 2: mid-task (some of the second stage's steps logged, not all).
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    metrics = second / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3,
              process, "three steps of the second stage")
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert len(metrics.read_text().splitlines()) < 6, "the stage was not interrupted"
    _continual(config)
    resumed = _results(run)
    for key in ("matrix", "initial", "general_ppl", "average_accuracy", "bwt", "forgetting"):
        assert resumed[key] == expected[key], key
    for stage in ("01-dmy", "02-ymd"):
        losses = [[r["loss"] for r in map(json.loads, (d / "run" / "stages" / stage /
                                                       "metrics.jsonl").read_text().splitlines())]
                  for d in (straight, killed)]
        assert losses[0] == losses[1] and len(losses[0]) == 6, stage


@pytest.mark.parametrize("edit, key", [
    (lambda c: c["tasks"][1].update(train="/nonexistent.jsonl"), "tasks[1].train"),
    (lambda c: c["tasks"][1].update(name="dmy"), "tasks[1].name"),
    (lambda c: c["tasks"][0].pop("eval"), "tasks[0].eval"),
    (lambda c: c["tasks"][0].update(lr=1), "tasks[0].lr"),
    (lambda c: c["continual"].update(strategy="ewc"), "continual.strategy"),
    (lambda c: c["continual"].update(ratio=0.5), "continual.ratio"),
    (lambda c: c["continual"].update(strategy="olora", buffer="x"), "continual.buffer"),
    (lambda c: c["continual"].update(strategy="osf"), "method.name"),
    (lambda c: c.update(tasks=[]), "tasks"),
    (lambda c: c["eval"].update(every=5), "eval.every"),
    (lambda c: c.update(objective="orpo"), "objective"),
    (lambda c: c["data"].update(train="x.jsonl"), "data.train"),
])
def test_bad_configs_are_one_line_naming_the_key(setup, tmp_path, capsys, edit, key):
    path = _config(setup, tmp_path)
    config = yaml.safe_load(path.read_text())
    edit(config)
    path.write_text(yaml.safe_dump(config))
    code, _, err = _in_process(capsys, path)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and key in err, err
    assert not (tmp_path / "run").exists()


def test_shipped_tasks_route_to_their_adapters():
    """The ConPET selector on the bundled model's features sends held-out prompts of the
    shipped tasks to their own task."""
    import jft
    from jft.continual.selector import fit_selector, prompt_features

    model = jft.load("smollm2-135m-instruct")
    tasks = sorted(p.name for p in EXAMPLES.iterdir() if (p / "train.jsonl").exists())
    assert len(tasks) >= 4

    def prompts(task, split, count):
        lines = (EXAMPLES / task / f"{split}.jsonl").read_text().splitlines()[:count]
        return [model.tokenizer.encode(json.loads(line)["prompt"]) for line in lines]

    train = [prompt_features(model.config, model.params, prompts(t, "train", 30)) for t in tasks]
    selector = fit_selector(np.concatenate(train),
                            np.repeat(np.arange(len(tasks)), [len(f) for f in train]),
                            len(tasks))
    for index, task in enumerate(tasks):
        held_out = prompt_features(model.config, model.params, prompts(task, "eval", 24))
        assert (selector.predict(held_out) == index).mean() >= 0.95, task
