"""Training-step memory at long sequences: blockwise attention and the chunked loss.

    python benchmarks/long_context.py --seq-lens 1024 2048 4096 --json results.json

The model is SmolLM2-135M's shape (9 heads, vocabulary 49,152) with random bf16 weights;
the method is LoRA r=16 on all linears. For each sequence length the step is compiled
three ways:

- `xla+whole`: XLA's attention (the [B, N, T, S] logits and probabilities kept for the
  backward pass, every layer) and the loss over the whole [B, T, V] float32 logits: jft
  before this change;
- `blockwise+whole`: `jft.models.attention.blockwise_attention`, whole logits;
- `blockwise+chunked`: blockwise attention and `jft.training.step`'s chunked cross-entropy
  (float32 logits of at most LOSS_CHUNK_BYTES per chunk, recomputed in the backward
  pass): the default now.

It reports XLA's `memory_analysis()` of the compiled step (peak = arguments +
temporaries + outputs - aliased) and, with `--steps N`, the median of N step times
after one warm-up step (0: compile only). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jft.models import ModelConfig, RopeConfig, RuntimePolicy, init_params
from jft.objectives import sft
from jft.peft import create
from jft.peft.optim import masked_optimizer
from jft.training import step as step_module

SMOLLM2_SHAPE = ModelConfig(
    family="llama", vocab_size=49152, embed_dim=576, num_layers=30, num_heads=9,
    num_kv_heads=3, head_dim=64, mlp_dim=1536, norm_eps=1e-5, rope=RopeConfig(theta=100000.0),
    layer_types=("full",) * 30, tie_embeddings=True, policy=RuntimePolicy(dtype="bfloat16"),
)
MIB = 2**20


def measure(model, params, batch_size, seq_len, chunk_bytes, steps):
    sft.LOSS_CHUNK_BYTES = chunk_bytes
    times, losses = [], []
    base, adapter = create("lora", jax.random.key(0), params, model, r=16, alpha=32,
                           targets="all-linear")
    optimizer = masked_optimizer(optax.adamw(1e-4), [adapter])
    state = step_module.init_state([adapter], optimizer, 0)
    rng = np.random.default_rng(0)
    shape = (batch_size, seq_len)
    batch = {"tokens": jnp.asarray(rng.integers(0, model.vocab_size, shape), jnp.int32),
             "segment_ids": jnp.ones(shape, jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), shape),
             "loss_mask": jnp.ones(shape, bool)}
    # A fresh jit per variant: a cached trace would keep the chunk size it was traced with.
    step = jax.jit(step_module._train_step, static_argnums=(0, 1), donate_argnums=2)
    compiled = step.lower(model, optimizer, state, base, batch).compile()
    stats = compiled.memory_analysis()
    peak = (stats.argument_size_in_bytes + stats.temp_size_in_bytes
            + stats.output_size_in_bytes - stats.alias_size_in_bytes)
    for i in range(steps + 1 if steps else 0):
        start = time.perf_counter()
        state, metrics = compiled(state, base, batch)
        jax.block_until_ready((state, metrics))
        losses.append(float(metrics["loss"]))
        if i:
            times.append(time.perf_counter() - start)
    return {"peak_bytes": int(peak), "temp_bytes": int(stats.temp_size_in_bytes),
            "step_time_s": statistics.median(times) if times else None, "losses": losses}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    params = init_params(SMOLLM2_SHAPE, jax.random.key(0), dtype=jnp.bfloat16)
    chunked = sft.LOSS_CHUNK_BYTES
    variants = {"xla+whole": ("xla", 2**62), "blockwise+whole": ("blockwise", 2**62),
                "blockwise+chunked": ("blockwise", chunked)}
    records = []
    for seq_len in args.seq_lens:
        for name, (attention, chunk_bytes) in variants.items():
            model = SMOLLM2_SHAPE.replace(attention_impl=attention)
            record = {"variant": name, "seq": seq_len, "batch": args.batch_size,
                      "chunk_bytes": chunk_bytes,
                      **measure(model, params, args.batch_size, seq_len, chunk_bytes,
                                args.steps)}
            records.append(record)
            step = ("-" if record["step_time_s"] is None
                    else f"{record['step_time_s'] * 1e3:.0f} ms")
            print(f"seq {seq_len:>5} {name:<18} peak {record['peak_bytes'] / MIB:9.1f} MiB  "
                  f"temp {record['temp_bytes'] / MIB:9.1f} MiB  step {step}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": jax.devices()[0].device_kind,
                                         "jax": jax.__version__, "records": records},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
