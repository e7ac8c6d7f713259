"""Every continual strategy on the shipped task sequence (examples/continual/), one after
another on the same machine, and the comparison table.

    python benchmarks/continual.py --out runs/continual-bench \
        --json benchmarks/results/continual_cpu.json [--only sequential replay]

Each strategy is `python -m jft.continual examples/continual/config.yaml` with its
overrides (STRATEGIES below), in its own directory under --out; a finished run is reused
(the CLI resumes it), so an interrupted benchmark continues. Prints the markdown table of
`python -m jft.continual compare` and writes every run's continual.json into --json.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "continual" / "config.yaml"

# name -> overrides of examples/continual/config.yaml (LoRA r 16 on all linears unless
# the strategy trains another method).
STRATEGIES = {
    "sequential": ["continual.strategy=sequential"],
    "sequential-merge": ["continual.strategy=sequential",
                         "continual.merge_between_tasks=true"],
    "replay": ["continual.strategy=replay"],
    "gere": ["continual.strategy=gere"],
    "olora": ["continual.strategy=olora"],
    "osf": ["continual.strategy=osf", "method={name: osf}", "train.learning_rate=1.0e-4"],
    "hft": ["continual.strategy=hft", "method={name: hft}", "train.learning_rate=1.0e-4"],
    "conpet-static": ["continual.strategy=conpet", "continual.mode=static"],
    "conpet-dynamic": ["continual.strategy=conpet", "continual.mode=dynamic"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "continual-bench")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", nargs="*", choices=sorted(STRATEGIES))
    args = parser.parse_args()
    names = args.only or list(STRATEGIES)
    for name in names:
        run = args.out / name
        print(f"== {name}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "jft.continual", str(CONFIG),
                        *STRATEGIES[name], f"output_dir={run}"], check=True, cwd=ROOT)
    runs = [args.out / name for name in names]
    subprocess.run([sys.executable, "-m", "jft.continual", "compare", *map(str, runs)],
                   check=True, cwd=ROOT)
    if args.json:
        records = {name: json.loads((run / "continual.json").read_text())
                   for name, run in zip(names, runs, strict=True)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
