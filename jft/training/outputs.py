"""What a run writes as it trains: metrics.jsonl, the eval generations, TensorBoard events,
the loss-curve PNG, and the throughput figures (tokens/s, honest MFU). The directory itself,
its config.yaml and its lock: `jft.training.run_dir`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax

from jft.errors import JftError
from jft.models import ModelConfig

METRICS_FILE = "metrics.jsonl"
EVAL_BEFORE_FILE = "eval_before.json"
GENERATIONS_FILE = "eval_generations.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"

# Dense bf16 peak FLOP/s per device, from the vendors' datasheets (no sparsity).
_PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def free_name(directory: Path) -> Path:
    for index in range(1, 10_000):
        candidate = directory.with_name(f"{directory.name}.old{index}")
        if not candidate.exists():
            return candidate
    raise JftError(f"{directory}: too many old runs beside it; remove some")


class MetricsLog:
    """metrics.jsonl (one object per logged step), eval_generations.jsonl (one object per
    exact-match example per evaluation) and TensorBoard events."""

    def __init__(self, directory: Path, resume_step: int):
        self.path = directory / METRICS_FILE
        self.generations_path = directory / GENERATIONS_FILE
        for path in (self.path, self.generations_path):
            _keep_until(path, resume_step)
        self.file = open(self.path, "a")
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(directory / "tensorboard"))

    def write(self, record: dict[str, Any]):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, record["step"])

    def write_generations(self, step: int, rows: list[dict[str, Any]]):
        """Appends one evaluation's generations (prompt, reference, generated, match), so the
        file shows the answers before training (step 0) and at every evaluation after."""
        with open(self.generations_path, "a") as file:
            file.writelines(json.dumps({"step": step, **row}) + "\n" for row in rows)

    def records(self) -> list[dict]:
        return _read_lines(self.path)

    def close(self):
        self.file.close()
        self.writer.close()


def _read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _keep_until(path: Path, step: int):
    """Drops the lines logged after `step`, which the resumed run logs again (all of them
    when it starts over from step 0, as its before-training evaluation runs again)."""
    if path.exists():
        kept = [record for record in _read_lines(path) if step and record["step"] <= step]
        path.write_text("".join(json.dumps(record) + "\n" for record in kept))


def loss_curve_series(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """The run's (step, loss) lines: train loss, and eval loss from its before-training
    value at step 0 on."""
    records = _read_lines(directory / METRICS_FILE)
    before = directory / EVAL_BEFORE_FILE
    if before.exists():
        records.insert(0, {"step": 0, **json.loads(before.read_text())})
    return {"train loss": [(r["step"], r["loss"]) for r in records if "loss" in r],
            "eval loss": [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]}


def write_loss_curve(directory: Path) -> Path:
    """loss_curve.png of the run in `directory`, from its metrics.jsonl and eval_before.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for (label, points), style in zip(loss_curve_series(directory).items(), ("-", "o-"),
                                      strict=True):
        if points:
            axis.plot(*zip(*points, strict=True), style, label=label)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend()
    figure.tight_layout()
    path = directory / LOSS_CURVE_FILE
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def flops_per_token(model: ModelConfig, trainable: int, context: int) -> float:
    """Matmul FLOPs per trained token: forward 2N, the activation-gradient backward 2N, the
    weight-gradient backward 2 per trainable matmul weight (2N for full fine-tuning: the
    embedding table's gradient is a scatter, not a matmul), plus attention's score and
    value matmuls."""
    head = model.vocab_size * model.embed_dim
    # The embedding lookup is no matmul; the output head is, tied or not.
    layers = model.num_params() - head * (1 if model.tie_embeddings else 2) - model.embed_dim
    base = layers + head
    attention = 2 * 2 * model.num_layers * model.num_heads * model.head_dim * context
    forward = 2 * base + attention
    return 2 * forward + 2 * min(trainable, base)


def peak_flops() -> float | None:
    """The device's dense bf16 peak (all local devices), or None where unknown (CPUs)."""
    devices = jax.local_devices()
    kind = devices[0].device_kind
    for name, flops in _PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops * len(devices)
    return None


class Throughput:
    """Tokens/s and MFU over the interval since the last measurement, and the average over
    every measured interval (the run's summary). Compiling and evaluating fall outside:
    `restart` discards the interval they happened in."""

    def __init__(self, flops_per_token: float):
        self.flops_per_token = flops_per_token
        self.peak = peak_flops()
        self.start = time.perf_counter()
        self.tokens = self.steps = 0  # in the current interval
        self.total_tokens, self.total_seconds = 0, 0.0

    def count(self, tokens: int):
        self.tokens += tokens
        self.steps += 1

    def restart(self):
        self.start, self.tokens, self.steps = time.perf_counter(), 0, 0

    def measure(self) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = now - self.start
        rate = self.tokens / max(elapsed, 1e-9)
        out = {"tokens_per_s": rate, "step_time_s": elapsed / max(self.steps, 1)}
        self.total_tokens += self.tokens
        self.total_seconds += elapsed
        self.start, self.tokens, self.steps = now, 0, 0
        if self.peak:
            out["mfu"] = rate * self.flops_per_token / self.peak
        return out

    def average(self) -> float | None:
        """Tokens/s over every measured interval; None before the first."""
        return self.total_tokens / self.total_seconds if self.total_seconds else None
