"""Device bytes of a quantized base against the bf16 one (docs/quantization.md).

    python benchmarks/quantized.py [--models smollm2-135m-instruct gemma3-270m]

For each bundled model: the bytes of every params array as loaded in bf16, and with
`quantize=` nf4 (double quantization), int8, and nf4 with the embedding table quantized
too; with the conversion error `jft.load` reports. Writes benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import jft
from jft.quant.params import quantized_bytes

SETTINGS = {
    "bf16": {},
    "nf4": dict(quantize="nf4"),
    "int8": dict(quantize="int8"),
    "nf4+embeddings": dict(quantize="nf4", quantize_embeddings=True),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma3-270m"])
    args = parser.parse_args()
    results = []
    for name in args.models:
        base = None
        for label, settings in SETTINGS.items():
            model = jft.load(name, dtype="bfloat16", **settings)
            size = quantized_bytes(model.params)
            base = base or size
            row = {"model": name, "base": label, "bytes": size, "vs_bf16": size / base,
                   "conversion": model.quantization.summary() if model.quantization else ""}
            results.append(row)
            print(f"{name:24} {label:16} {size / 2**20:8.1f} MiB  {size / base:5.3f}x  "
                  f"{row['conversion']}")
    out = Path(__file__).parent / "results" / f"quantized_{datetime.date.today()}.json"
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
