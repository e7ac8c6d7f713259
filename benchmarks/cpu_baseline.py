"""CPU baseline for the bundled models: load time and peak memory, generation and
LoRA training throughput, each measured in a fresh process.

    python benchmarks/cpu_baseline.py --json benchmarks/results/cpu_baseline.json

Not part of the test suite. Medians over `--repeats` runs, after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

LOAD = """
import json, sys, time
t = time.perf_counter()
import jax, jax.numpy as jnp
jnp.zeros(1).block_until_ready()
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
base = rss("VmRSS")
start = time.perf_counter()
import jft
model = jft.load(sys.argv[1], dtype="float32")
jax.block_until_ready(model.params)
seconds = time.perf_counter() - start
size = sum(x.nbytes for x in jax.tree.leaves(model.params))
peak = rss("VmHWM") - base
print(json.dumps({"load_s": seconds, "param_bytes": size, "peak_rss_over_base": peak}))
"""


def measure_load(model: str) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD, model], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_generation(model_name: str, repeats: int) -> dict:
    import jft
    from jft.inference.generation import generate_tokens

    model = jft.load(model_name, dtype="float32")
    prompts = [model.encode_prompt(p, chat=True) for p in
               ("What is the capital of France?", "Name three colours.",
                "Write one sentence about the sea.", "What is 2 + 2?")]
    new_tokens = 64
    generate_tokens(model.config, model.params, prompts, new_tokens)  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate_tokens(model.config, model.params, prompts, new_tokens)
        times.append(time.perf_counter() - start)
    produced = sum(len(o) for o in out)
    median = statistics.median(times)
    return {"generate_batch": len(prompts), "generate_new_tokens": produced,
            "generate_s": median, "generate_tokens_per_s": produced / median}


def measure_training(model_name: str, repeats: int) -> dict:
    import jax
    import numpy as np
    import optax

    import jft
    from jft.peft import create
    from jft.sharding import MeshConfig, make_rules
    from jft.sharding.placement import put
    from jft.training.step import ShardedSteps

    model = jft.load(model_name, dtype="float32")
    base, adapter = create("lora", jax.random.key(0), model.params, model.config, r=16,
                           alpha=32, targets="all-linear")
    # The step `python -m jft.train` runs, on one device.
    steps = ShardedSteps(model.config, optax.adamw(1e-4),
                         make_rules(MeshConfig(), jax.devices()[:1]), base, [adapter], 0)
    base, state = put(base, steps.params), steps.initial_state
    batch_size, length = 4, 256
    rng = np.random.default_rng(0)
    batch = {
        "tokens": rng.integers(0, model.config.vocab_size, (batch_size, length)).astype(np.int32),
        "segment_ids": np.ones((batch_size, length), np.int32),
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch_size, length)),
        "loss_mask": np.ones((batch_size, length), bool),
    }
    state, metrics = steps.train(state, base, batch)  # compile
    float(metrics["loss"])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = steps.train(state, base, batch)
        float(metrics["loss"])
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"train_batch": batch_size, "train_seq": length, "train_step_s": median,
            "train_tokens_per_s": batch_size * length / median}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import jax

    records = []
    for name in args.models:
        record = {"model": name, "device": jax.devices()[0].device_kind,
                  "cpu": platform.processor() or platform.machine(), "jax": jax.__version__}
        record |= measure_load(name)
        record |= measure_generation(name, args.repeats)
        if name == "smollm2-135m-instruct":
            record |= measure_training(name, args.repeats)
        print(json.dumps(record), flush=True)
        records.append(record)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
