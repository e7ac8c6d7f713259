"""Quantized bases (docs/quantization.md): device bytes, a LoRA step's peak memory and
time, and whether Llama-3-8B with an NF4 base fits a 16 GB card.

    python benchmarks/quantized.py [--models smollm2-135m-instruct gemma3-270m]
        [--batch-size 4 --seq-len 128 --steps 3] [--skip-8b]

1. For each bundled model, loaded in bf16 and with `quantize=` nf4 (double
   quantization), int8, and nf4 with the embedding table too: the bytes of every params
   array, and the conversion error `jft.load` reports.
2. On the same bases, LoRA r=16 on all linears (`benchmarks/methods.py`'s `measure`:
   XLA's memory analysis of the compiled train step, median step time), side by side in
   this process on one random batch, with `--remat full` (QLoRA's gradient checkpointing)
   unless told otherwise.
3. Llama-3-8B's shapes (abstract: nothing is allocated), LoRA r=16, batch 1 x 1024,
   remat full, bf16 compute: the compiled step's peak bytes with a bf16 base and with an
   NF4 one.

Writes benchmarks/results/quantized_<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jft
from jft.quant.params import quantized_bytes

sys.path.insert(0, str(Path(__file__).parent))
import methods  # noqa: E402  (benchmarks/methods.py)

SETTINGS = {
    "bf16": {},
    "nf4": dict(quantize="nf4"),
    "int8": dict(quantize="int8"),
    "nf4+embeddings": dict(quantize="nf4", quantize_embeddings=True),
}
LLAMA3_8B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False,
}
GIB = 2**30


def _q4_0_file(name: str, directory: Path) -> Path:
    """The model written as a Q4_0 GGUF (`python -m jft.export --format gguf --quant
    q4_0` does the same), for the GGUF-native path: its Q4_0 tensors load as stored."""
    from jft.formats.gguf_export import write_gguf_file

    model = jft.load(name, dtype="float32")
    path = directory / f"{name}-q4_0.gguf"
    write_gguf_file(model.config, model.params, model.tokenizer, path, quant="q4_0")
    return path


def bases_and_steps(args) -> list[dict]:
    import tempfile

    results = []
    scratch = Path(tempfile.mkdtemp())
    for name in args.models:
        base_bytes = base_peak = base_time = None
        settings_of = dict(SETTINGS)
        settings_of["gguf q4_0, kept"] = dict(quantize="nf4", quantize_embeddings=True)
        for label, settings in settings_of.items():
            if args.labels and label not in args.labels:
                continue
            source = _q4_0_file(name, scratch) if label.startswith("gguf") else name
            model = jft.load(source, dtype="bfloat16", compute_dtype="bfloat16", **settings)
            size = quantized_bytes(model.params)
            batch = methods.random_batch(model.config.vocab_size, args.batch_size,
                                         args.seq_len, 0)
            step = methods.measure("lora", methods.LORA_OPTIONS, model.params,
                                   model.config.replace(kernels="xla", remat=args.remat),
                                   batch, args)
            base_bytes = base_bytes or size
            base_peak = base_peak or step["peak_bytes"]
            base_time = base_time or step["step_time_s"]
            row = {"model": name, "base": label, "base_bytes": size,
                   "base_vs_bf16": size / base_bytes, "peak_bytes": step["peak_bytes"],
                   "peak_vs_bf16": step["peak_bytes"] / base_peak,
                   "step_time_s": step["step_time_s"],
                   "time_vs_bf16": step["step_time_s"] / base_time,
                   "losses": step["losses"],
                   "conversion": model.quantization.summary() if model.quantization else ""}
            results.append(row)
            print(f"{name:22} {label:15} base {size / 2**20:7.1f} MiB ({row['base_vs_bf16']:.3f}x)"
                  f"  step peak {step['peak_bytes'] / 2**20:7.1f} MiB ({row['peak_vs_bf16']:.3f}x)"
                  f"  step {step['step_time_s'] * 1e3:7.0f} ms ({row['time_vs_bf16']:.2f}x)")
            del model
    return results


def _abstract_nf4(site, config, block=64) -> object:
    """ShapeDtypeStructs of a stacked NF4 weight with double quantization."""
    from jft.quant.tensor import SCALE_BLOCK, QuantizedTensor

    layers = config.num_layers
    dims_in, dims_out = site.dims(config)
    size_in = math.prod(dims_in)
    blocks = math.ceil(size_in / block)
    per_layer = math.prod(dims_out) * blocks
    return QuantizedTensor(
        jax.ShapeDtypeStruct((layers, *dims_out, blocks * block // 2), jnp.uint8),
        jax.ShapeDtypeStruct((layers, *dims_out, blocks), jnp.uint8),
        jax.ShapeDtypeStruct((layers, math.ceil(per_layer / SCALE_BLOCK)), jnp.float32),
        jax.ShapeDtypeStruct((layers,), jnp.float32), "nf4", block, size_in)


def llama3_8b_fit() -> list[dict]:
    from jft.models import config_from_hf, param_shapes
    from jft.models.sites import linear_sites
    from jft.peft import create
    from jft.peft.base import Adapter
    from jft.peft.optim import masked_optimizer
    from jft.training.step import _train_step, init_state

    config = config_from_hf(LLAMA3_8B, "Llama-3-8B").replace(dtype="bfloat16", remat="full",
                                                             kernels="xla")
    shapes = param_shapes(config)
    floats = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.bfloat16), shapes,
                          is_leaf=lambda s: isinstance(s, tuple))
    sites = {site.name: site for site in linear_sites(config)}
    nf4 = dict(floats, layers={k: _abstract_nf4(sites[k], config) if k in sites else v
                               for k, v in floats["layers"].items()})
    batch = {key: jax.ShapeDtypeStruct(value.shape, value.dtype) for key, value in
             methods.random_batch(config.vocab_size, 1, 1024, 0).items()}
    rows = []
    for label, base in (("bf16", floats), ("nf4", nf4)):
        lora_config = None

        def make_delta(b):
            nonlocal lora_config
            _, adapter = create("lora", jax.random.key(0), b, config, **methods.LORA_OPTIONS)
            lora_config = adapter.config
            return adapter.delta

        delta = jax.eval_shape(make_delta, base)
        adapters = [Adapter(delta, "lora", lora_config)]
        optimizer = masked_optimizer(optax.adamw(1e-4), adapters)
        state = jax.eval_shape(functools.partial(init_state, optimizer=optimizer, seed=0),
                               adapters)
        compiled = jax.jit(_train_step, static_argnums=(0, 1), donate_argnums=2).lower(
            config, optimizer, state, base, batch).compile()
        stats = compiled.memory_analysis()
        peak = (stats.argument_size_in_bytes + stats.temp_size_in_bytes
                + stats.output_size_in_bytes - stats.alias_size_in_bytes)
        base_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(base))
        rows.append({"model": "Llama-3-8B shapes", "base": label, "base_bytes": base_bytes,
                     "peak_bytes": int(peak), "fits_16gb": bool(peak < 16e9)})
        print(f"Llama-3-8B shapes {label:5} base {base_bytes / GIB:6.2f} GiB  step peak "
              f"{peak / GIB:6.2f} GiB  fits 16 GB: {peak < 16e9}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--remat", default="full", choices=methods.REMAT,
                        help="full: QLoRA's gradient checkpointing (the 8B check uses it too)")
    parser.add_argument("--skip-8b", action="store_true")
    parser.add_argument("--json", type=Path, help="where to write the results")
    parser.add_argument("--labels", nargs="*", help="only these bases (e.g. bf16 'gguf q4_0, "
                        "kept'); the ratios are then to the first one measured")
    args = parser.parse_args()
    args = types.SimpleNamespace(**vars(args), seed=0, learning_rate=1e-4)  # as measure reads
    results = bases_and_steps(args)
    if not args.skip_8b:
        results += llama3_8b_fit()
    out = args.json or Path(__file__).parent / "results" / f"quantized_{datetime.date.today()}.json"
    out.write_text(json.dumps(results, indent=1, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
