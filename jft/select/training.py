"""Training inside a selection: LESS's warm-up adapter, iterative kMQ's and active
learning's rounds. Each is an ordinary `jft.train` run (its own directory, config,
metrics and checkpoints; rerun, it resumes or is found finished) over a data file the
selection wrote."""

from __future__ import annotations

import copy
from pathlib import Path

from jft.errors import JftError


def train_run(raw: dict, train_file: Path, output_dir: Path, source: str) -> Path:
    """Trains the `jft.train` config mapping `raw` on `train_file` into `output_dir`."""
    from jft.train import Run
    from jft.training.config import from_dict

    raw = copy.deepcopy(raw)
    raw.setdefault("data", {})["train"] = str(train_file)
    raw["output_dir"] = str(output_dir)
    config = from_dict(raw, source=source)
    run = Run(config, source=source)
    run.train()
    return run.directory


def steps_for(examples: int, batch_size: int, epochs: float) -> int:
    """Optimiser steps of `epochs` passes over `examples` unpacked examples."""
    if examples < 1:
        raise JftError("nothing to train on: the selected set is empty")
    return max(1, round(epochs * -(-examples // batch_size)))
