"""The Pallas kernels against their XLA references, at Llama-3-8B shapes.

    python benchmarks/kernels.py --json results.json            # on a GPU or TPU
    python benchmarks/kernels.py --quick --json smoke.json      # tiny shapes, any machine

Four parts, each timed as the median of `--iters` calls after `--warmup`, every call
jitted and waited for:

1. `lora_linear`, y = x W + s (x A) B, for each linear of one Llama-3-8B layer (q, k, v,
   o, gate, up, down; K x N from 4096 x 1024 to 4096 x 14336) at `--tokens` tokens and
   rank `--rank`: forward, and forward + backward (dx, dA, dB; W frozen), kernel vs
   reference. The issue's target: >= 1.2x on forward + backward.
2. `s2ft_linear`: S2FT's block beside the frozen weight (o_proj and down_proj with the
   input-side block, q_proj and up_proj with the output-side one), `--s2ft-width`
   columns wide, forward + backward, kernel vs reference.
3. Multi-adapter serving: one decode step of the seven linears over `--rows` rows, the
   rows spread over 1, 8, 64 and 512 distinct adapters (`gathered_lora`), and a prefill
   of `--tokens` tokens sorted into as many groups (`grouped_lora`), each as the shared
   base matmul plus the kernel's (or the reference's) per-row deltas, against one
   merged model's plain matmuls. Throughput = rows (tokens) per second; the target is
   >= 0.8x the merged model's at 64 adapters.
4. `quant_matmul`: QLoRA's frozen base linear, x @ W^T with W block-quantized (nf4 with
   double quantization, QLoRA's default; int8; GGUF's q8_0 and q4_0), for q_proj (4096 x
   4096), up_proj (4096 x 14336) and down_proj (14336 x 4096) at `--quant-tokens` tokens:
   forward, and forward + backward (dx only; W is frozen), the fused dequantizing kernel
   vs the reference (dequantize W in XLA, then a GEMM).

Pallas on CPU runs in interpret mode, so CPU timings say nothing about the kernels'
speed: `--quick` only checks that the script and every kernel run. The summary ends with
the `MEASURED_FASTER` entries (jft/pallas_kernels/__init__.py) the timings justify on
this platform. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import platform as host_platform
import statistics
import time
from datetime import date
from functools import partial
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from jft.pallas_kernels.compat import platform
from jft.pallas_kernels.lora_linear import lora_linear, lora_linear_reference
from jft.pallas_kernels.multi_lora import (
    gathered_lora,
    gathered_lora_reference,
    grouped_lora,
    grouped_lora_reference,
)
from jft.pallas_kernels.quant_matmul import quant_matmul, quant_matmul_reference
from jft.pallas_kernels.s2ft_linear import (
    s2ft_input_side,
    s2ft_input_side_reference,
    s2ft_output_side,
    s2ft_output_side_reference,
)
from jft.quant import QuantizedTensor, quantize
from jft.quant.formats import FORMATS

# (K, N) of each linear of one Llama-3-8B layer (hidden 4096, 8 KV heads of 128, MLP 14336).
LLAMA_8B = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024),
            "o_proj": (4096, 4096), "gate_proj": (4096, 14336), "up_proj": (4096, 14336),
            "down_proj": (14336, 4096)}
TINY = {name: (k // 64, n // 64) for name, (k, n) in LLAMA_8B.items()}
INPUT_SIDE = ("o_proj", "down_proj")
ADAPTER_COUNTS = (1, 8, 64, 512)
LORA_SCALE = 2.0  # alpha / r = 32 / 16
QUANT_MODULES = ("q_proj", "up_proj", "down_proj")
# (format, block, double quantization)
QUANT_FORMATS = (("nf4", 64, True), ("int8", 64, False), ("q8_0", 32, False),
                 ("q4_0", 32, False))
# 1/32 of Llama-3-8B's dims (1/64 would leave down_proj's K = 224, not whole nf4 blocks,
# and the kernel would fall back to the reference).
QUANT_TINY = {name: (k // 32, n // 32) for name, (k, n) in LLAMA_8B.items()}


def timed(fn, *args, warmup: int, iters: int) -> float:
    """Median seconds of one call of the jitted `fn`."""
    jax.block_until_ready(fn(*args))
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_backward(linear, argnums):
    """f(*args) -> (y, grads of sum(y * probe) w.r.t. argnums): the training-step pattern."""
    def run(*args):
        probe = args[-1]
        y, pullback = jax.vjp(lambda *a: linear(*a), *args[:-1])
        grads = pullback(probe.astype(y.dtype))
        return y, tuple(grads[i] for i in argnums)
    return jax.jit(run)


def lora_records(shapes, tokens, rank, dtype, timing):
    records = []
    key = jax.random.key(0)
    for name, (k, n) in shapes.items():
        kx, kw, ka, kb, kp = jax.random.split(jax.random.fold_in(key, hash(name) % 2**31), 5)
        x = jax.random.normal(kx, (tokens, k), dtype)
        w = (jax.random.normal(kw, (k, n), jnp.float32) / k**0.5).astype(dtype)
        a = (jax.random.normal(ka, (k, rank), jnp.float32) / k**0.5).astype(dtype)
        b = (jax.random.normal(kb, (rank, n), jnp.float32) * 0.01).astype(dtype)
        probe = jax.random.normal(kp, (tokens, n), dtype)
        row = {"part": "lora_linear", "module": name, "K": k, "N": n, "tokens": tokens,
               "rank": rank}
        for impl, fn in (("pallas", lora_linear), ("xla", lora_linear_reference)):
            forward = jax.jit(lambda x, w, a, b, fn=fn: fn(x, w, a, b, LORA_SCALE))
            both = forward_backward(lambda x, w, a, b, fn=fn: fn(x, w, a, b, LORA_SCALE),
                                    (0, 2, 3))
            row[f"{impl}_forward_s"] = timed(forward, x, w, a, b, **timing)
            row[f"{impl}_forward_backward_s"] = timed(both, x, w, a, b, probe, **timing)
        row["speedup_forward"] = row["xla_forward_s"] / row["pallas_forward_s"]
        row["speedup_forward_backward"] = (row["xla_forward_backward_s"]
                                           / row["pallas_forward_backward_s"])
        records.append(row)
        print(f"lora_linear {name:<9} {k:>5}x{n:<5}  fwd x{row['speedup_forward']:.2f}  "
              f"fwd+bwd x{row['speedup_forward_backward']:.2f}  "
              f"(xla {row['xla_forward_backward_s'] * 1e3:.2f} ms, "
              f"pallas {row['pallas_forward_backward_s'] * 1e3:.2f} ms)", flush=True)
    return records


def s2ft_records(shapes, tokens, block_width, dtype, timing):
    records = []
    key = jax.random.key(1)
    for name in ("q_proj", "o_proj", "up_proj", "down_proj"):
        k, n = shapes[name]
        width = min(block_width, k if name in INPUT_SIDE else n)
        kx, kw, kb, kp = jax.random.split(jax.random.fold_in(key, hash(name) % 2**31), 4)
        x = jax.random.normal(kx, (tokens, k), dtype)
        w = (jax.random.normal(kw, (k, n), jnp.float32) / k**0.5).astype(dtype)
        block_shape = (width, n) if name in INPUT_SIDE else (k, width)
        block = (jax.random.normal(kb, block_shape, jnp.float32) * 0.01).astype(dtype)
        probe = jax.random.normal(kp, (tokens, n), dtype)
        kernel, reference = ((s2ft_input_side, s2ft_input_side_reference) if name in INPUT_SIDE
                             else (s2ft_output_side, s2ft_output_side_reference))
        kernel = partial(kernel, fuse=True)  # the fused backward, whatever the width rule says
        row = {"part": "s2ft_linear", "module": name, "K": k, "N": n, "tokens": tokens,
               "block_width": width}
        for impl, fn in (("pallas", kernel), ("xla", reference)):
            both = forward_backward(fn, (0, 2))
            row[f"{impl}_forward_backward_s"] = timed(both, x, w, block, probe, **timing)
        row["speedup_forward_backward"] = (row["xla_forward_backward_s"]
                                           / row["pallas_forward_backward_s"])
        records.append(row)
        print(f"s2ft_linear {name:<9} {k:>5}x{n:<5} block {width:>5}  "
              f"fwd+bwd x{row['speedup_forward_backward']:.2f}", flush=True)
    return records


def multi_lora_records(shapes, rows, tokens, rank, dtype, timing, adapter_counts):
    """Throughput of the seven linears with per-row adapters vs one merged model."""
    records = []
    key = jax.random.key(2)
    weights = {name: (jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.float32)
                      / k**0.5).astype(dtype)
               for i, (name, (k, n)) in enumerate(shapes.items())}

    def merged(x_by_module):
        return [x @ weights[name] for name, x in x_by_module.items()]

    for mode, count_rows in (("decode", rows), ("prefill", tokens)):
        inputs = {name: jax.random.normal(jax.random.fold_in(key, 100 + i), (count_rows, k),
                                          dtype)
                  for i, (name, (k, _)) in enumerate(shapes.items())}
        merged_s = timed(jax.jit(merged), inputs, **timing)
        for count in adapter_counts:
            factors = {}
            for i, (name, (k, n)) in enumerate(shapes.items()):
                ka, kb = jax.random.split(jax.random.fold_in(key, 1000 * count + i))
                factors[name] = (
                    (jax.random.normal(ka, (count, k, rank), jnp.float32) / k**0.5).astype(dtype),
                    (jax.random.normal(kb, (count, rank, n), jnp.float32) * 0.01).astype(dtype))
            scales = jnp.full((count,), LORA_SCALE, jnp.float32)
            # Every adapter gets an equal share of the rows (decode: interleaved, as
            # requests arrive; prefill: sorted into contiguous groups).
            ids = jnp.arange(count_rows, dtype=jnp.int32) % count
            sizes = jnp.bincount(ids, length=count).astype(jnp.int32)
            row = {"part": "multi_lora", "mode": mode, "adapters": count, "rows": count_rows,
                   "rank": rank, "merged_s": merged_s}
            for impl in ("pallas", "xla"):
                if mode == "decode":
                    delta = gathered_lora if impl == "pallas" else gathered_lora_reference
                    route = ids
                else:
                    delta = grouped_lora if impl == "pallas" else grouped_lora_reference
                    route = sizes

                def served(x_by_module, factors, route=route, delta=delta, scales=scales):
                    return [x @ weights[name]
                            + delta(x, route, *factors[name], scales).astype(x.dtype)
                            for name, x in x_by_module.items()]

                row[f"{impl}_s"] = timed(jax.jit(served), inputs, factors, **timing)
                row[f"{impl}_vs_merged"] = merged_s / row[f"{impl}_s"]
            row["rows_per_s_merged"] = count_rows / merged_s
            row["rows_per_s_pallas"] = count_rows / row["pallas_s"]
            records.append(row)
            print(f"multi_lora {mode:<7} {count:>4} adapters  pallas x{row['pallas_vs_merged']:.2f}"
                  f"  xla x{row['xla_vs_merged']:.2f} of the merged model's throughput",
                  flush=True)
    return records


def quantized_weight(array, format, block, double_quant) -> QuantizedTensor:
    """`array` [N, K] quantized. GGUF's formats are built as a GGUF file provides them (the
    gguf package's bytes, split into codes and scales)."""
    if format in ("q8_0", "q4_0"):
        codes, scales = FORMATS[format].split(gguf.quants.quantize(array, FORMATS[format].qtype))
        weight = QuantizedTensor(codes, scales, None, None, format, 32, array.shape[1])
    else:
        weight = quantize(array, format, block, double_quant)
    return jax.tree.map(jnp.asarray, weight)


def quant_records(shapes, tokens, dtype, timing):
    records = []
    rng = np.random.default_rng(3)
    key = jax.random.key(3)
    for name in QUANT_MODULES:
        k, n = shapes[name]
        kx, kp = jax.random.split(jax.random.fold_in(key, hash(name) % 2**31))
        x = jax.random.normal(kx, (tokens, k), dtype)
        probe = jax.random.normal(kp, (tokens, n), dtype)
        # Quantized on the host, as a checkpoint is; the weight is [N, K], K contracted.
        array = rng.standard_normal((n, k), np.float32) / np.float32(k**0.5)
        for format, block, double_quant in QUANT_FORMATS:
            weight = quantized_weight(array, format, block, double_quant)
            row = {"part": "quant_matmul", "module": name, "K": k, "N": n, "tokens": tokens,
                   "format": format, "block": block, "double_quant": double_quant}
            for impl, fn in (("pallas", quant_matmul), ("xla", quant_matmul_reference)):
                # dx only: the weight is an argument (not a baked-in constant) whose
                # cotangent, unused, is dropped by jit.
                row[f"{impl}_forward_s"] = timed(jax.jit(fn), x, weight, **timing)
                both = forward_backward(fn, (0,))
                row[f"{impl}_forward_backward_s"] = timed(both, x, weight, probe, **timing)
            row["speedup_forward"] = row["xla_forward_s"] / row["pallas_forward_s"]
            row["speedup_forward_backward"] = (row["xla_forward_backward_s"]
                                               / row["pallas_forward_backward_s"])
            records.append(row)
            print(f"quant_matmul {name:<9} {k:>5}x{n:<5} {format:<4}  "
                  f"fwd x{row['speedup_forward']:.2f} "
                  f"(xla {row['xla_forward_s'] * 1e3:.2f} ms, "
                  f"pallas {row['pallas_forward_s'] * 1e3:.2f} ms)  "
                  f"fwd+bwd x{row['speedup_forward_backward']:.2f} "
                  f"(xla {row['xla_forward_backward_s'] * 1e3:.2f} ms, "
                  f"pallas {row['pallas_forward_backward_s'] * 1e3:.2f} ms)", flush=True)
    return records


def measured_faster(records) -> dict[str, bool]:
    """Whether each kernel beat its reference here (forward + backward where measured)."""
    verdict = {}
    lora = [r["speedup_forward_backward"] for r in records if r["part"] == "lora_linear"]
    s2ft = [r["speedup_forward_backward"] for r in records if r["part"] == "s2ft_linear"]
    multi = [r["xla_s"] / r["pallas_s"] for r in records if r["part"] == "multi_lora"]
    quant = [r["speedup_forward_backward"] for r in records if r["part"] == "quant_matmul"]
    for name, ratios in (("lora_linear", lora), ("s2ft_linear", s2ft), ("multi_lora", multi),
                         ("quant_matmul", quant)):
        if ratios:
            verdict[name] = statistics.median(ratios) > 1.0
    return verdict


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes (1/64 of Llama-3-8B's) and few iterations")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of a training step")
    parser.add_argument("--rows", type=int, default=512, help="rows of a decode step")
    parser.add_argument("--quant-tokens", type=int, default=2048,
                        help="tokens through quant_matmul (a QLoRA step's micro-batch)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--s2ft-width", type=int, default=512,
                        help="S2FT block width: 4 heads of 128 for q/o, 512 channels for up/down")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if args.json.exists() and not args.overwrite:
        parser.error(f"{args.json} exists; pass --overwrite to replace it")
    shapes, tokens, rows, counts = LLAMA_8B, args.tokens, args.rows, ADAPTER_COUNTS
    quant_shapes, quant_tokens = LLAMA_8B, args.quant_tokens
    timing = {"warmup": args.warmup, "iters": args.iters}
    if args.quick:
        shapes, tokens, rows, counts = TINY, 64, 16, (1, 8)
        quant_shapes, quant_tokens = QUANT_TINY, 64
        timing = {"warmup": 1, "iters": 2}
    dtype = jnp.dtype(args.dtype)
    width = 8 if args.quick else args.s2ft_width
    records = lora_records(shapes, tokens, args.rank, dtype, timing)
    records += s2ft_records(shapes, tokens, width, dtype, timing)
    records += multi_lora_records(shapes, rows, tokens, args.rank, dtype, timing, counts)
    records += quant_records(quant_shapes, quant_tokens, dtype, timing)
    verdict = measured_faster(records)
    print(f"\nplatform {platform()}: kernels faster than their references here: "
          f"{sorted(k for k, v in verdict.items() if v) or 'none'}")
    summary = {
        "device": jax.devices()[0].device_kind, "platform": platform(),
        "date": date.today().isoformat(), "quick": args.quick, "dtype": args.dtype,
        "versions": {"jax": jax.__version__, "python": host_platform.python_version()},
        "measured_faster": verdict, "records": records,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
