"""Memory and step time of fine-tuning methods on one model, batch and sequence length.

    python benchmarks/methods.py --model smollm2-135m-instruct --json results.json
    python benchmarks/methods.py --model M --methods full lora s2ft --batch-size 8 \\
        --seq-len 512 --remat dots --json results.json

For each method the training step (`jft.training.step._train_step`, the body of
`ShardedSteps.train`, with AdamW through `masked_optimizer`), jitted here on one device
with the state donated, is compiled on the same random batch, and the script reports:

- XLA's `memory_analysis()` of the compiled step: argument, temporary, output and aliased
  (donated) bytes, and `peak_bytes` = arguments + temporaries + outputs - aliased;
- `step_time_s`: the median over `--steps` timed steps, after `--warmup` untimed ones
  (each step fed the previous one's donated state, and waited for);
- `trainable_params`: the method's own count (`num_params`);
- `input_bytes`: all the step's inputs, including arguments jit drops as unused (full
  fine-tuning's base, which its delta replaces but which stays on the device), and
  `losses`, the loss of every step (a sanity check, on random tokens).

Only the jitted step is timed: the periodic `refresh_state` of SpIEL, LISA and HFT (and
the host-to-device copy of the batch, which is placed once) is not. Methods are measured
one after another in this process; each one's buffers and compiled step are freed before
the next. Methods this checkout's `jft.peft` does not have yet are skipped with a note.

Not part of the test suite. Bad input (unknown method, missing model, existing --json
without --overwrite) is one `error:` line and exit status 2.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from pathlib import Path

from jft.errors import JftError, run_cli
from jft.generate import ArgumentParser

# The default set, in order; `--methods` picks a subset by name. `spiel` gets
# `num_tunable_weights` (LoRA's trainable count on this model) at run time.
LORA_OPTIONS = {"r": 16, "alpha": 32, "targets": "all-linear"}
METHODS: dict[str, dict] = {
    "full": {},
    "lora": LORA_OPTIONS,
    # The S2FT paper's efficiency setting.
    "s2ft": {"attention_modules": ["o_proj"], "attention_ratio": 0.052,
             "mlp_modules": ["down_proj"], "mlp_ratio": 0.02},
    "spiel": {},  # num_tunable_weights: LoRA's trainable count
    "lisa": {"activated_layers": 2, "interval_steps": 20},
    "hft": {},
}
DTYPES = ("auto", "float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots", "dots_no_batch")
MIB = 2**20


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python benchmarks/methods.py",
        description="Compiled memory and step time of fine-tuning methods on one model.",
    )
    parser.add_argument("--model", required=True,
                        help="bundled name (smollm2-135m-instruct, gemma3-270m), HF dir or .gguf")
    parser.add_argument("--json", type=Path, help="write the records here (a JSON list)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD",
                        help=f"subset of: {', '.join(METHODS)} (default: all)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="params dtype")
    parser.add_argument("--compute-dtype", default="bfloat16", choices=DTYPES,
                        help="activations dtype")
    parser.add_argument("--remat", default="none", choices=REMAT,
                        help="remat policy of the layer scan")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def check_args(args) -> list[str]:
    """The methods to run, after refusing bad flags before anything slow happens."""
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise JftError(f"--methods: unknown method {unknown[0]!r}; valid: {', '.join(METHODS)}")
    for flag in ("batch_size", "seq_len", "steps"):
        if getattr(args, flag) < 1:
            raise JftError(f"--{flag.replace('_', '-')} must be at least 1, "
                           f"got {getattr(args, flag)}")
    if args.seq_len < 2:
        raise JftError(f"--seq-len must be at least 2 (one target token), got {args.seq_len}")
    if args.warmup < 0:
        raise JftError(f"--warmup must be at least 0, got {args.warmup}")
    if args.json is not None:
        if args.json.exists() and not args.overwrite:
            raise JftError(f"{args.json}: already exists; pass --overwrite to replace it")
        if args.json.is_dir():
            raise JftError(f"{args.json}: is a directory; give a file path for --json")
    return list(dict.fromkeys(args.methods))  # in the order given, without repeats


def random_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (batch_size, seq_len)
    return {
        "tokens": rng.integers(0, vocab_size, shape).astype(np.int32),
        "segment_ids": np.ones(shape, np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), shape).copy(),
        "loss_mask": np.ones(shape, bool),
    }


def lora_count(params, model_config, seed: int) -> int:
    """LoRA's trainable parameters with the default options, on this model."""
    import jax

    from jft.peft import create

    _, adapter = create("lora", jax.random.key(seed), params, model_config, None, **LORA_OPTIONS)
    return adapter.impl.num_params(adapter.delta, model_config, adapter.config)


def _out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def measure(method: str, options: dict, params, model_config, batch, args) -> dict:
    """One method: build, compile, memory analysis, timed steps. Frees what it made."""
    import jax
    import optax

    from jft.peft import create
    from jft.peft.optim import masked_optimizer
    from jft.training.step import _train_step, init_state

    base, adapter = create(method, jax.random.key(args.seed), params, model_config, [batch],
                           **options)
    trainable = adapter.impl.num_params(adapter.delta, model_config, adapter.config)
    optimizer = masked_optimizer(optax.adamw(args.learning_rate), [adapter])
    state = init_state([adapter], optimizer, args.seed)
    del adapter  # the state holds its own (float32) copy of the delta
    record: dict = {"trainable_params": int(trainable)}

    # Jitted here rather than through ShardedSteps: its compiled form gives the memory
    # analysis. A fresh jit per method, freed with it.
    step = jax.jit(_train_step, static_argnums=(0, 1), donate_argnums=2)
    compiled = step.lower(model_config, optimizer, state, base, batch).compile()
    stats = compiled.memory_analysis()
    if stats is not None:
        memory = {
            "argument_bytes": int(stats.argument_size_in_bytes),
            "temp_bytes": int(stats.temp_size_in_bytes),
            "output_bytes": int(stats.output_size_in_bytes),
            "alias_bytes": int(stats.alias_size_in_bytes),
        }
        memory["peak_bytes"] = (memory["argument_bytes"] + memory["temp_bytes"]
                                + memory["output_bytes"] - memory["alias_bytes"])
    else:  # a backend without memory analysis
        memory = dict.fromkeys(
            ("argument_bytes", "temp_bytes", "output_bytes", "alias_bytes", "peak_bytes"))
    record |= memory
    # Everything handed to the step, unused arguments included: jit drops arguments the
    # step never reads from `argument_bytes` (full fine-tuning never reads the base it
    # replaces), though they stay resident on the device all the same.
    record["input_bytes"] = sum(int(x.nbytes) for x in jax.tree.leaves((state, base, batch)))

    times, losses = [], []
    try:
        for i in range(args.warmup + args.steps):
            start = time.perf_counter()
            state, metrics = compiled(state, base, batch)  # the state is donated: feed it on
            jax.block_until_ready((state, metrics))
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
            losses.append(float(metrics["loss"]))
    except Exception as error:  # noqa: BLE001 - an OOM on one method should not end the run
        if not _out_of_memory(error):
            raise
        record["error"] = " ".join(str(error).split())[:300]
    record["step_time_s"] = statistics.median(times) if times and "error" not in record else None
    record["step_times_s"] = times
    record["losses"] = losses
    del state, base, compiled, step, optimizer
    return record


def params_dtype(params) -> str:
    import jax
    import jax.numpy as jnp

    counts: dict[str, int] = {}
    for leaf in jax.tree.leaves(params):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            counts[str(leaf.dtype)] = counts.get(str(leaf.dtype), 0) + leaf.size
    return max(counts, key=counts.get) if counts else "unknown"


def _mib(value) -> str:
    return "-" if value is None else f"{value / MIB:.1f}"


def print_table(records: list[dict]) -> None:
    header = (f"{'method':<8} {'trainable':>12} {'peak MiB':>10} {'args MiB':>10} "
              f"{'temp MiB':>10} {'out MiB':>9} {'alias MiB':>10} {'inputs MiB':>11} "
              f"{'step ms':>9}")
    print(header)
    print("-" * len(header))
    for r in records:
        step = "-" if r["step_time_s"] is None else f"{r['step_time_s'] * 1e3:.1f}"
        print(f"{r['method']:<8} {r['trainable_params']:>12,} {_mib(r['peak_bytes']):>10} "
              f"{_mib(r['argument_bytes']):>10} {_mib(r['temp_bytes']):>10} "
              f"{_mib(r['output_bytes']):>9} {_mib(r['alias_bytes']):>10} "
              f"{_mib(r['input_bytes']):>11} {step:>9}")


def _ratio(a, b) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.3f}"


def print_ratios(records: list[dict]) -> None:
    by_name = {r["method"]: r for r in records}
    full = by_name.get("full")
    if full is not None:
        print("\nvs full fine-tuning (peak memory, step time):")
        for r in records:
            if r["method"] != "full":
                print(f"  {r['method']:<8} memory x{_ratio(r['peak_bytes'], full['peak_bytes'])}"
                      f"  time x{_ratio(r['step_time_s'], full['step_time_s'])}")
    s2ft, lora = by_name.get("s2ft"), by_name.get("lora")
    if s2ft is not None and lora is not None:
        print(f"\ns2ft vs lora: memory x{_ratio(s2ft['peak_bytes'], lora['peak_bytes'])}"
              f"  time x{_ratio(s2ft['step_time_s'], lora['step_time_s'])}"
              f"  trainable x{_ratio(s2ft['trainable_params'], lora['trainable_params'])}")


def write_json(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(records, indent=1) + "\n")
    partial.replace(path)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    names = check_args(args)

    import jax

    import jft
    import jft.peft

    available = [m for m in names if m in jft.peft.REGISTRY]
    for name in names:
        if name not in available:
            print(f"note: skipping {name}: this jft.peft has no {name!r} method yet", flush=True)
    if not available:
        raise JftError(f"none of --methods {' '.join(names)} is in jft.peft; "
                       f"available: {', '.join(m for m in METHODS if m in jft.peft.REGISTRY)}")

    model = jft.load(args.model, dtype=args.dtype, compute_dtype=args.compute_dtype)
    model_config = model.config.replace(remat=args.remat)
    params = model.params
    tokenizer = model.tokenizer
    del model
    batch = jax.device_put(random_batch(model_config.vocab_size, args.batch_size, args.seq_len,
                                        args.seed))
    common = {
        "model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "dtype": params_dtype(params), "compute_dtype": model_config.dtype,
        "remat": args.remat, "device": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
    }
    del tokenizer
    print(f"{args.model}: batch {args.batch_size} x {args.seq_len}, params {common['dtype']}, "
          f"compute {common['compute_dtype']}, remat {args.remat}, on {common['device']} "
          f"(jax {jax.__version__}); {args.warmup} warm-up + {args.steps} timed steps",
          flush=True)

    records = []
    for name in available:
        options = dict(METHODS[name])
        if name == "spiel":
            options["num_tunable_weights"] = lora_count(params, model_config, args.seed)
        print(f"{name}: compiling and running ...", flush=True)
        result = measure(name, options, params, model_config, batch, args)
        jax.clear_caches()
        gc.collect()
        record = {"method": name, "options": options} | result | common
        records.append(record)
        if "error" in record:
            print(f"note: {name} ran out of memory: {record['error']}", flush=True)
        else:
            print(f"{name}: peak {_mib(record['peak_bytes'])} MiB, step "
                  f"{record['step_time_s'] * 1e3:.1f} ms, {record['trainable_params']:,} "
                  f"trainable, loss {record['losses'][0]:.3f} -> {record['losses'][-1]:.3f}",
                  flush=True)
        if args.json is not None:  # after every method, so a later failure keeps these
            write_json(args.json, records)

    print()
    print_table(records)
    print_ratios(records)
    if args.json is not None:
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
