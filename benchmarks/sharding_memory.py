"""Base bytes per device when a bundled model loads sharded onto a mesh, and the load time.

    python benchmarks/sharding_memory.py --devices 8 --json benchmarks/results/sharding.json

Without accelerators it uses that many virtual CPU devices (set before JAX starts). Each
mesh loads in the same process, one after the other; medians over `--repeats` loads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--meshes", default="1,8,1;2,4,1;1,4,2;8,1,1",
                        help="data,fsdp,tensor sizes separated by ';'")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    os.environ.setdefault("XLA_FLAGS",
                          f"--xla_force_host_platform_device_count={args.devices}")

    import jax

    import jft
    from jft.sharding import MeshConfig, make_rules
    from jft.sharding.placement import bytes_per_device, total_bytes

    rows = []
    for text in args.meshes.split(";"):
        shape = tuple(int(size) for size in text.split(","))
        rules = make_rules(MeshConfig(*shape))
        seconds, model = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            model = jft.load(args.model, dtype=args.dtype, rules=rules)
            jax.block_until_ready(model.params)
            seconds.append(time.perf_counter() - start)
        held = max(bytes_per_device(model.params).values())
        total = total_bytes(model.params)
        rows.append({"mesh": shape, "base_mib": total / 2**20, "max_device_mib": held / 2**20,
                     "share": held / total, "load_s": statistics.median(seconds)})
        print(f"mesh {shape}: base {total / 2**20:.1f} MiB, at most {held / 2**20:.1f} MiB "
              f"on one device ({held / total:.3f}), load {rows[-1]['load_s']:.1f} s",
              flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"model": args.model, "dtype": args.dtype, "devices": jax.device_count(),
                       "backend": jax.default_backend(), "rows": rows}, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
