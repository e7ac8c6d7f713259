"""What a run writes: its directory, resolved config, metrics.jsonl, TensorBoard events,
the loss-curve PNG, and the throughput figures (tokens/s, honest MFU)."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import yaml

from jft.errors import JftError
from jft.models import ModelConfig

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"

# Dense bf16 peak FLOP/s per device, from the vendors' datasheets (no sparsity).
_PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def prepare_run_dir(output_dir: str, resolved: dict, fingerprint: str, overwrite: bool) -> bool:
    """Creates the run directory; True when it holds this same run to resume.

    Another config's run is refused; with `overwrite` it is moved aside (never deleted).
    """
    directory = Path(output_dir)
    config_path = directory / CONFIG_FILE
    if directory.exists() and any(directory.iterdir()):
        existing = _read_fingerprint(config_path)
        if existing == fingerprint and not overwrite:
            return True
        if not overwrite:
            reason = ("holds a run of another config" if existing else
                      "is not empty and holds no jft run")
            raise JftError(f"{directory}: output_dir {reason}; choose another output_dir, or "
                           "pass --overwrite to move it aside and start fresh")
        aside = free_name(directory)
        shutil.move(str(directory), aside)
        print(f"moved the previous run to {aside}", file=sys.stderr)
    directory.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump({**resolved, "fingerprint": fingerprint},
                                          sort_keys=False))
    return False


def _read_fingerprint(path: Path) -> str | None:
    try:
        return yaml.safe_load(path.read_text()).get("fingerprint")
    except (OSError, AttributeError, yaml.YAMLError):
        return None


def free_name(directory: Path) -> Path:
    for index in range(1, 10_000):
        candidate = directory.with_name(f"{directory.name}.old{index}")
        if not candidate.exists():
            return candidate
    raise JftError(f"{directory}: too many old runs beside it; remove some")


class MetricsLog:
    """metrics.jsonl (one object per logged step) plus TensorBoard events."""

    def __init__(self, directory: Path, resume_step: int):
        self.path = directory / METRICS_FILE
        if self.path.exists():  # drop what was logged after the restored checkpoint
            kept = [line for line in self._lines() if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(kept))
        self.file = open(self.path, "a")
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(directory / "tensorboard"))

    def _lines(self) -> list[str]:
        return self.path.read_text().splitlines(keepends=True) if self.path.exists() else []

    def write(self, record: dict[str, Any]):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, record["step"])

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self._lines()]

    def close(self):
        self.file.close()
        self.writer.close()


def write_loss_curve(records: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if train:
        axis.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        axis.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def flops_per_token(model: ModelConfig, full_backward: bool, trainable: int,
                    context: int) -> float:
    """Matmul FLOPs per trained token: forward 2N, the activation-gradient backward 2N,
    and the weight-gradient backward 2N only for full fine-tuning (PEFT methods pay
    2 x trainable instead), plus attention's score and value matmuls."""
    head = model.vocab_size * model.embed_dim
    # The embedding lookup is no matmul; the output head is, tied or not.
    layers = model.num_params() - head * (1 if model.tie_embeddings else 2) - model.embed_dim
    base = layers + head
    attention = 2 * 2 * model.num_layers * model.num_heads * model.head_dim * context
    forward = 2 * base + attention
    return 2 * forward + (2 * base if full_backward else 2 * trainable)


def peak_flops() -> float | None:
    """The device's dense bf16 peak (all local devices), or None where unknown (CPUs)."""
    devices = jax.local_devices()
    kind = devices[0].device_kind
    for name, flops in _PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops * len(devices)
    return None


class Throughput:
    """Tokens/s and MFU over the interval since the last call."""

    def __init__(self, flops_per_token: float):
        self.flops_per_token = flops_per_token
        self.peak = peak_flops()
        self.start = time.perf_counter()

    def restart(self):
        self.start = time.perf_counter()

    def measure(self, tokens: int) -> dict[str, float]:
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        rate = tokens / max(elapsed, 1e-9)
        out = {"tokens_per_s": rate}
        if self.peak:
            out["mfu"] = rate * self.flops_per_token / self.peak
        return out
