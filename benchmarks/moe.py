"""Mixture-of-experts: the grouped expert path against the dense reference and against the
dense model with the same active parameters, one LoRA training step each.

    python benchmarks/moe.py --json benchmarks/results/moe_cpu_2026-12-07.json
    python benchmarks/moe.py --experts 8 32 64 --batch-size 4 --seq-len 256 --steps 5 \\
        --dtype float32 --json results.json --overwrite

A small Qwen3-MoE shape with random weights (`jft.models.init_params`; defaults: embed 256,
4 layers, 8 query / 2 kv heads of 32, vocab 8192, q/k norms, top-k 2 of E experts of width
256, the chosen weights renormalised) is trained with LoRA r=16 alpha=32 on q/k/v/o and on
the routed experts' stacks (`target_parameters: [mlp.experts.gate_up_proj,
mlp.experts.down_proj]`, one pair of factors per expert; the router is not a target) in
three configurations:

- `grouped`: `moe_impl: grouped` (the default): the (token, choice) rows sorted by expert,
  each expert multiplying only its rows (`jft.models.grouped.grouped_matmul`:
  `jax.lax.ragged_dot` on GPU/TPU, a tiled `lax.scan` with a custom VJP on CPU);
- `dense`: `moe_impl: dense`, every token through every expert, the unchosen weighted 0:
  E / k times the expert FLOPs, the reference the tests compare the grouped path to;
- `equivalent dense`: the Qwen3 model of the same shape with one SwiGLU MLP of width
  top_k x expert_mlp_dim (the same active matmul parameters per token), LoRA r=16 on
  q/k/v/o and gate/up/down. It does not depend on E, so it is measured once.

Each configuration's training step is `jft.training.step._train_step` (AdamW through
`masked_optimizer`), jitted on one device with the state donated as
`benchmarks/methods.py` does it, and compiled on the same random batch. Reported per
configuration: XLA's `memory_analysis()` of the compiled step (`peak_bytes` = arguments
+ temporaries + outputs - aliased), the median step time over `--steps` timed steps after
`--warmup` untimed ones, and tokens/s = batch x seq / median. All configurations stay
compiled together and their steps are taken round-robin (one step of each in turn), so
that other load on the machine falls on all of them alike; `os.getloadavg()` is recorded
before and after.

Then, unless `--kernel-reps 0`, the experts' gate/up product alone on the step's rows
(batch x seq x top_k, sorted by expert): the tiled grouped matmul (the CPU path),
`jax.lax.ragged_dot` as XLA:CPU runs it (one masked dense matmul per expert), and one
plain matmul of the same rows (the FLOP floor), forward and forward + backward.

Sanity check: for each E, grouped and dense start from the same params, adapter and batch,
so their first-step losses (and, through the same updates, the later ones) must agree:
both are printed with their difference, and a mismatch beyond the dtype's tolerance is
reported as an error line and exit status 1 (after the JSON is written).

Not part of the test suite. Bad input (an existing --json without --overwrite, sizes below
1) is one `error:` line and exit status 2.
"""

from __future__ import annotations

import datetime
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from jft.errors import JftError, run_cli
from jft.generate import ArgumentParser

# This script's folder leaves sys.path (a sibling script can shadow a package, as
# benchmarks/vs_peft.py explains) and methods.py is loaded by its path.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != HERE]


def _load_methods():
    spec = importlib.util.spec_from_file_location("benchmarks_methods", HERE / "methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


methods = _load_methods()
MIB = methods.MIB
DTYPES = ("float32", "bfloat16")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_STACKS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
DENSE_MLP = ["gate_proj", "up_proj", "down_proj"]
# |grouped - dense| loss tolerance, relative, per dtype (the two paths sum the same
# products in different orders; bf16 rounds the activations between them).
LOSS_RTOL = {"float32": 1e-4, "bfloat16": 2e-2}
EQUIVALENT = "equivalent dense"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python benchmarks/moe.py",
        description="MoE LoRA training step: grouped experts vs the dense reference vs the "
                    "equivalent dense model (memory, step time, tokens/s).",
    )
    parser.add_argument("--json", type=Path, help="write the results here (a JSON object)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32], metavar="E",
                        help="numbers of experts to measure (default: 8 32)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token")
    parser.add_argument("--expert-mlp-dim", type=int, default=256, help="each expert's width")
    parser.add_argument("--embed-dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="params and activations dtype (default float32: XLA:CPU "
                             "upcasts bf16 matmuls to f32, see BENCHMARKS.md)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--remat", default="none", choices=methods.REMAT,
                        help="remat policy of the layer scan")
    parser.add_argument("--no-equivalent", action="store_true",
                        help="skip the equivalent dense model")
    parser.add_argument("--kernel-reps", type=int, default=10,
                        help="timed repetitions of the kernel-only comparison (0: skip it)")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def check_args(args) -> None:
    for flag in ("top_k", "expert_mlp_dim", "embed_dim", "layers", "heads", "kv_heads",
                 "head_dim", "vocab", "batch_size", "steps", "rank"):
        if getattr(args, flag) < 1:
            raise JftError(f"--{flag.replace('_', '-')} must be at least 1, "
                           f"got {getattr(args, flag)}")
    if args.seq_len < 2:
        raise JftError(f"--seq-len must be at least 2 (one target token), got {args.seq_len}")
    if args.kernel_reps < 0:
        raise JftError(f"--kernel-reps must be at least 0, got {args.kernel_reps}")
    if args.warmup < 0:
        raise JftError(f"--warmup must be at least 0, got {args.warmup}")
    bad = [e for e in args.experts if e < args.top_k]
    if bad:
        raise JftError(f"--experts: {bad[0]} experts cannot serve --top-k {args.top_k}")
    if args.heads % args.kv_heads:
        raise JftError(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    if args.json is not None:
        if args.json.exists() and not args.overwrite:
            raise JftError(f"{args.json}: already exists; pass --overwrite to replace it")
        if args.json.is_dir():
            raise JftError(f"{args.json}: is a directory; give a file path for --json")
    args.experts = list(dict.fromkeys(args.experts))


def model_configs(args):
    """{name: ModelConfig}: the equivalent dense model, then grouped and dense per E."""
    from jft.models import ModelConfig, MoeConfig, RopeConfig, RuntimePolicy

    common = dict(vocab_size=args.vocab, embed_dim=args.embed_dim, num_layers=args.layers,
                  num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                  norm_eps=1e-6, rope=RopeConfig(theta=1_000_000.0),
                  layer_types=("full",) * args.layers, qk_norm=True,
                  policy=RuntimePolicy(dtype=args.dtype, remat=args.remat))
    configs = {}
    if not args.no_equivalent:
        configs[EQUIVALENT] = ModelConfig(family="qwen3", mlp_dim=args.top_k * args.expert_mlp_dim,
                                          **common)
    for experts in args.experts:
        moe = MoeConfig(num_experts=experts, top_k=args.top_k,
                        expert_mlp_dim=args.expert_mlp_dim)
        base = ModelConfig(family="qwen3_moe", mlp_dim=args.expert_mlp_dim, moe=moe, **common)
        for impl in ("grouped", "dense"):
            configs[f"E={experts} {impl}"] = base.replace(moe_impl=impl)
    return configs


def active_matmul_params(config) -> int:
    """Matmul weights one token multiplies by: attention, its k experts' (or the dense
    MLP's) gate/up/down, the router, the LM head."""
    d, h, kv, hd = config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim
    attention = d * h * hd * 2 + d * kv * hd * 2
    if config.moe is None:
        mlp = 3 * d * config.mlp_dim
    else:
        mlp = 3 * d * config.moe.expert_mlp_dim * config.moe.top_k + d * config.moe.num_experts
    return config.num_layers * (attention + mlp) + d * config.vocab_size


def prepare(name, config, params, lora, batch, args) -> tuple[dict, list]:
    """Compile one configuration's step: (record, [compiled, state, base])."""
    import jax
    import optax

    from jft.peft import create
    from jft.peft.optim import masked_optimizer
    from jft.training.step import _train_step, init_state

    base, adapter = create("lora", jax.random.key(args.seed), params, config, None, **lora)
    trainable = adapter.impl.num_params(adapter.delta, config, adapter.config)
    optimizer = masked_optimizer(optax.adamw(args.learning_rate), [adapter])
    state = init_state([adapter], optimizer, args.seed)
    del adapter
    step = jax.jit(_train_step, static_argnums=(0, 1), donate_argnums=2)
    start = time.perf_counter()
    compiled = step.lower(config, optimizer, state, base, batch).compile()
    compile_s = time.perf_counter() - start
    stats = compiled.memory_analysis()
    record = {"name": name, "family": config.family,
              "moe_impl": config.moe_impl if config.moe else None,
              "num_experts": config.num_experts or None,
              "mlp_dim": config.mlp_dim if config.moe is None else None,
              "lora": lora, "trainable_params": int(trainable),
              "total_params": int(config.num_params()),
              "active_matmul_params_per_token": active_matmul_params(config),
              "compile_s": compile_s}
    if stats is not None:
        memory = {"argument_bytes": int(stats.argument_size_in_bytes),
                  "temp_bytes": int(stats.temp_size_in_bytes),
                  "output_bytes": int(stats.output_size_in_bytes),
                  "alias_bytes": int(stats.alias_size_in_bytes)}
        memory["peak_bytes"] = (memory["argument_bytes"] + memory["temp_bytes"]
                                + memory["output_bytes"] - memory["alias_bytes"])
    else:
        memory = dict.fromkeys(("argument_bytes", "temp_bytes", "output_bytes", "alias_bytes",
                                "peak_bytes"))
    record |= memory
    record["input_bytes"] = sum(int(x.nbytes) for x in jax.tree.leaves((state, base, batch)))
    record |= {"step_times_s": [], "losses": []}
    return record, [compiled, state, base]


def run_rounds(records, runs, batch, args) -> None:
    """Round-robin: one step of each configuration in turn, `warmup + steps` rounds."""
    import jax

    for i in range(args.warmup + args.steps):
        line = []
        for record, run in zip(records, runs, strict=True):
            compiled, state, base = run
            start = time.perf_counter()
            run[1], metrics = compiled(state, base, batch)  # the state is donated
            jax.block_until_ready((run[1], metrics))
            elapsed = time.perf_counter() - start
            if i >= args.warmup:
                record["step_times_s"].append(elapsed)
            record["losses"].append(float(metrics["loss"]))
            line.append(f"{record['name']} {elapsed * 1e3:.0f} ms")
        kind = "warm-up" if i < args.warmup else "timed"
        print(f"round {i + 1} ({kind}): " + ", ".join(line), flush=True)
    tokens = args.batch_size * args.seq_len
    for record in records:
        median = statistics.median(record["step_times_s"])
        record["step_time_s"] = median
        record["tokens_per_s"] = tokens / median


def sanity(records, args) -> list[dict]:
    """Grouped vs dense losses per E (same params, adapter and batch)."""
    by_name = {r["name"]: r for r in records}
    checks = []
    for experts in args.experts:
        grouped, dense = by_name[f"E={experts} grouped"], by_name[f"E={experts} dense"]
        diffs = [abs(a - b) for a, b in zip(grouped["losses"], dense["losses"], strict=True)]
        first_rel = diffs[0] / max(abs(dense["losses"][0]), 1e-12)
        check = {"num_experts": experts, "grouped_first_loss": grouped["losses"][0],
                 "dense_first_loss": dense["losses"][0], "first_abs_diff": diffs[0],
                 "first_rel_diff": first_rel, "max_abs_diff_all_steps": max(diffs),
                 "rtol": LOSS_RTOL[args.dtype], "ok": first_rel <= LOSS_RTOL[args.dtype]}
        checks.append(check)
        print(f"sanity E={experts}: first-step loss grouped {check['grouped_first_loss']:.6f}, "
              f"dense {check['dense_first_loss']:.6f}, |diff| {check['first_abs_diff']:.2e} "
              f"(rel {first_rel:.1e}, tolerance {check['rtol']:.0e}): "
              f"{'ok' if check['ok'] else 'MISMATCH'}; max |diff| over all "
              f"{len(diffs)} steps {check['max_abs_diff_all_steps']:.2e}", flush=True)
    return checks


def ratios(records, args) -> dict:
    by_name = {r["name"]: r for r in records}
    out = {}
    equivalent = by_name.get(EQUIVALENT)
    for experts in args.experts:
        grouped, dense = by_name[f"E={experts} grouped"], by_name[f"E={experts} dense"]
        entry = {"grouped_over_dense": {
            "peak": grouped["peak_bytes"] / dense["peak_bytes"],
            "temp": grouped["temp_bytes"] / dense["temp_bytes"],
            "step_time": grouped["step_time_s"] / dense["step_time_s"]}}
        if equivalent is not None:
            for impl, record in (("grouped", grouped), ("dense", dense)):
                entry[f"{impl}_over_equivalent_dense"] = {
                    "peak": record["peak_bytes"] / equivalent["peak_bytes"],
                    "temp": record["temp_bytes"] / equivalent["temp_bytes"],
                    "step_time": record["step_time_s"] / equivalent["step_time_s"]}
        out[f"E={experts}"] = entry
    return out


def kernel_bench(args) -> list[dict]:
    """The expert gate/up product alone, forward and forward + backward (dx and dw), for
    the step's rows (batch x seq x top_k tokens-choices of embed_dim, sorted by expert,
    group sizes from top-k of random router logits): the tiled grouped matmul that runs on
    CPU, `jax.lax.ragged_dot` (XLA:CPU's fallback: one masked dense matmul per group), and
    one plain matmul of the same rows through a single weight (the FLOP floor). Timed
    round-robin, median of `--kernel-reps`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jft.models.grouped import TILE, grouped_matmul  # on CPU: the tiled kernel

    dtype = jnp.dtype(args.dtype)
    tokens = args.batch_size * args.seq_len
    rows, k_dim, n_dim = tokens * args.top_k, args.embed_dim, 2 * args.expert_mlp_dim
    rng = np.random.default_rng(args.seed)
    x = jnp.asarray(rng.standard_normal((rows, k_dim)), dtype)
    out = []
    for experts in args.experts:
        logits = rng.standard_normal((tokens, experts))
        chosen = np.argsort(-logits, axis=1)[:, :args.top_k].reshape(-1)
        sizes = np.bincount(chosen, minlength=experts).astype(np.int32)
        starts, ends = np.cumsum(sizes) - sizes, np.cumsum(sizes)
        tiles_used = int(sum((e - 1) // TILE - s // TILE + 1
                             for s, e in zip(starts, ends, strict=True) if e > s))
        w = jnp.asarray(rng.standard_normal((experts, k_dim, n_dim)) / np.sqrt(k_dim), dtype)
        group_sizes = jnp.asarray(sizes)
        kernels = {  # name: (function, its weight)
            "one matmul (floor)": (lambda x, w, g: x @ w, w[0]),
            "tiled grouped (CPU path)": (grouped_matmul, w),
            "ragged_dot (XLA:CPU fallback)": (jax.lax.ragged_dot, w),
        }
        jitted = {}
        for name, (fn, weight) in kernels.items():
            jitted[(name, "forward")] = (jax.jit(fn), weight)
            jitted[(name, "forward+backward")] = (jax.jit(jax.grad(
                lambda x, w, g, fn=fn: jnp.sum(fn(x, w, g).astype(jnp.float32) ** 2),
                argnums=(0, 1))), weight)
        times = {key: [] for key in jitted}
        for i in range(1 + args.kernel_reps):
            for key, (fn, weight) in jitted.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(x, weight, group_sizes))
                if i:
                    times[key].append(time.perf_counter() - start)
        reference = np.asarray(jax.jit(jax.lax.ragged_dot)(x, w, group_sizes), np.float32)
        tiled = np.asarray(jax.jit(grouped_matmul)(x, w, group_sizes), np.float32)
        record = {"num_experts": experts, "rows": rows, "k": k_dim, "n": n_dim, "tile": TILE,
                  "group_sizes_min_max": [int(sizes.min()), int(sizes.max())],
                  "tiles_computed": tiles_used, "tiles_if_one_group": -(-rows // TILE),
                  "tiled_vs_ragged_dot_max_abs_diff": float(np.max(np.abs(tiled - reference))),
                  "median_s": {f"{name} {mode}": statistics.median(t)
                               for (name, mode), t in times.items()}}
        out.append(record)
        print(f"kernel E={experts}: {rows} rows x {k_dim} -> {n_dim}, groups "
              f"{sizes.min()}..{sizes.max()} rows, {tiles_used} tiles of {TILE} computed "
              f"(one group: {record['tiles_if_one_group']}); tiled vs ragged_dot max |diff| "
              f"{record['tiled_vs_ragged_dot_max_abs_diff']:.1e}", flush=True)
        for key, median in record["median_s"].items():
            print(f"  {key:<45} {median * 1e3:8.2f} ms", flush=True)
    return out


def _mib(value) -> str:
    return "-" if value is None else f"{value / MIB:.1f}"


def print_table(records) -> None:
    header = (f"{'configuration':<18} {'trainable':>11} {'params':>11} {'peak MiB':>9} "
              f"{'args MiB':>9} {'temp MiB':>9} {'step ms':>8} {'tokens/s':>9} "
              f"{'compile s':>9}")
    print(header)
    print("-" * len(header))
    for r in records:
        print(f"{r['name']:<18} {r['trainable_params']:>11,} {r['total_params']:>11,} "
              f"{_mib(r['peak_bytes']):>9} {_mib(r['argument_bytes']):>9} "
              f"{_mib(r['temp_bytes']):>9} {r['step_time_s'] * 1e3:>8.0f} "
              f"{r['tokens_per_s']:>9.0f} {r['compile_s']:>9.1f}")


def print_ratios(found) -> None:
    for key, entry in found.items():
        parts = []
        for name, ratio in entry.items():
            parts.append(f"{name.replace('_', ' ')}: peak x{ratio['peak']:.3f}, "
                         f"time x{ratio['step_time']:.3f}")
        print(f"{key}: " + "; ".join(parts))


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)

    import jax
    import jax.numpy as jnp

    from jft.models import init_params

    load_before = os.getloadavg()
    started = time.perf_counter()
    configs = model_configs(args)
    batch = jax.device_put(methods.random_batch(args.vocab, args.batch_size, args.seq_len,
                                                args.seed))
    alpha = 2 * args.rank
    moe_lora = {"r": args.rank, "alpha": alpha, "targets": ATTENTION,
                "target_parameters": EXPERT_STACKS}
    dense_lora = {"r": args.rank, "alpha": alpha, "targets": ATTENTION + DENSE_MLP}

    print(f"Qwen3-MoE shape: embed {args.embed_dim}, {args.layers} layers, {args.heads}/"
          f"{args.kv_heads} heads of {args.head_dim}, vocab {args.vocab}, top-{args.top_k} of "
          f"E in {args.experts} experts of width {args.expert_mlp_dim}; batch "
          f"{args.batch_size} x {args.seq_len}, {args.dtype}, remat {args.remat}, LoRA "
          f"r{args.rank}; on {jax.devices()[0].device_kind} (jax {jax.__version__}); "
          f"{args.warmup} warm-up + {args.steps} timed rounds; load average "
          f"{' '.join(f'{x:.2f}' for x in load_before)}", flush=True)

    records, runs = [], []
    params_by_experts = {}
    for name, config in configs.items():
        key = config.num_experts
        if key not in params_by_experts:  # grouped and dense share one set of params
            params_by_experts[key] = init_params(config, jax.random.key(args.seed),
                                                 dtype=jnp.dtype(args.dtype))
        lora = moe_lora if config.moe else dense_lora
        print(f"{name}: compiling ...", flush=True)
        record, run = prepare(name, config, params_by_experts[key], lora, batch, args)
        print(f"{name}: peak {_mib(record['peak_bytes'])} MiB (temporaries "
              f"{_mib(record['temp_bytes'])}), {record['trainable_params']:,} trainable, "
              f"compiled in {record['compile_s']:.1f} s", flush=True)
        records.append(record)
        runs.append(run)
    del params_by_experts
    gc.collect()

    run_rounds(records, runs, batch, args)
    del runs
    gc.collect()
    kernels = kernel_bench(args) if args.kernel_reps else []
    load_after = os.getloadavg()
    checks = sanity(records, args)
    found = ratios(records, args)
    results = {
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/moe.py " + " ".join(argv),
        "machine": {"device": jax.devices()[0].device_kind, "platform": platform.platform(),
                    "processor": platform.machine(), "cpu_count": os.cpu_count(),
                    "jax_version": jax.__version__},
        "load_average_before": list(load_before), "load_average_after": list(load_after),
        "wall_s": time.perf_counter() - started,
        "shape": {"family": "qwen3_moe", "embed_dim": args.embed_dim, "layers": args.layers,
                  "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                  "vocab": args.vocab, "experts": args.experts, "top_k": args.top_k,
                  "expert_mlp_dim": args.expert_mlp_dim,
                  "equivalent_dense_mlp_dim": args.top_k * args.expert_mlp_dim},
        "batch_size": args.batch_size, "seq_len": args.seq_len, "dtype": args.dtype,
        "remat": args.remat, "warmup": args.warmup, "steps": args.steps,
        "records": records, "sanity": checks, "ratios": found, "kernel": kernels,
    }

    print()
    print_table(records)
    print()
    print_ratios(found)
    print(f"\nload average before {' '.join(f'{x:.2f}' for x in load_before)}, after "
          f"{' '.join(f'{x:.2f}' for x in load_after)}; {results['wall_s']:.0f} s in all")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        partial = args.json.with_name(args.json.name + ".partial")
        partial.write_text(json.dumps(results, indent=1) + "\n")
        partial.replace(args.json)
        print(f"wrote {args.json}")
    bad = [c for c in checks if not c["ok"]]
    if bad:
        print(f"error: grouped and dense losses differ beyond tolerance for E="
              f"{', '.join(str(c['num_experts']) for c in bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
