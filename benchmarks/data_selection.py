"""Data selection on a noisy pool: what each `python -m jft.select` method picks, and the
quickstart's exact match after training on it, against a random subset of the same size.

    python examples/select/make_pool.py      # the pool, its labels and the target (shipped)
    python benchmarks/data_selection.py --json benchmarks/results/select_cpu_2026-12-07.json

The pool (examples/select/) holds 300 clean examples of the quickstart task (ISO date to
DD/MM/YYYY), 600 of the same prompt with wrong answers and 2,400 of eight other tasks;
the target is 16 clean examples. Each method chooses 5% and 10% of the pool through the
CLI (SmolLM2-135M-Instruct scores; `--cache-dir` shares embeddings and losses between
methods, and one LESS warm-up and its scores between the budgets), and the record keeps
the share of chosen records that are clean on-task ones (from
examples/select/pool_labels.jsonl, which no method reads). Then the quickstart config
trains unchanged on each subset (`data.train=SUBSET`) and its final eval exact match on
examples/quickstart/eval.jsonl (32 held-out dates) is recorded. Every result is written
to the JSON as soon as it exists, so a run cut short keeps what it finished; rerun with
the same --json and --work to continue. `--table` prints the markdown table (clean,
wrong-answer and other-task shares of each subset) from the JSON and the work folder.

Active learning is `python -m jft.select active examples/select/active.yaml` and the
same with `strategy=random` (docs/selection.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POOL = ROOT / "examples/select/pool.jsonl"
LABELS = ROOT / "examples/select/pool_labels.jsonl"
TARGET = ROOT / "examples/select/target.jsonl"
QUICKSTART = ROOT / "examples/quickstart/config.yaml"
EXTRA = {"less": ["--dim", "1024", "--warmup-epochs", "1"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+",
                        default=["random", "got-d", "kmq", "dedup", "perplexity", "ifd", "less"])
    parser.add_argument("--budgets", nargs="+", default=["5%", "10%"])
    parser.add_argument("--json", required=True)
    parser.add_argument("--work", default="runs/select-benchmark")
    parser.add_argument("--no-train", action="store_true", help="selection only")
    parser.add_argument("--table", action="store_true",
                        help="print the markdown table of what --json and --work hold")
    args = parser.parse_args()
    if args.table:
        return table(Path(args.json), Path(args.work))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.json)
    results = json.loads(out.read_text()) if out.exists() else {"runs": []}
    done = {(r["method"], r["budget"]): r for r in results["runs"]}
    clean = [json.loads(line)["kind"] == "clean" for line in LABELS.read_text().splitlines()]
    for method in args.methods:
        for budget in args.budgets:
            record = done.get((method, budget), {"method": method, "budget": budget})
            subset = work / f"{method}-{budget.rstrip('%')}.jsonl"
            if "clean_share" not in record:
                started = time.perf_counter()
                run([sys.executable, "-m", "jft.select", "--model", "smollm2-135m-instruct",
                     "--pool", str(POOL), "--target", str(TARGET), "--method", method,
                     "--budget", budget, "--out", str(subset), "--max-length", "96",
                     "--batch-size", "32", "--cache-dir", str(work / "cache"),
                     "--work-dir", str(work / f"{method}-work"), *EXTRA.get(method, [])])
                record["select_s"] = round(time.perf_counter() - started, 1)
                chosen = [json.loads(line)["index"] for line in
                          subset.with_name(subset.stem + ".scores.jsonl").read_text().splitlines()
                          if json.loads(line)["selected"]]
                record["chosen"] = len(chosen)
                record["clean_share"] = sum(clean[i] for i in chosen) / len(chosen)
                save(out, results, done, record)
            if not args.no_train and "exact_match" not in record:
                run_dir = work / f"train-{method}-{budget.rstrip('%')}"
                run([sys.executable, "-m", "jft.train", str(QUICKSTART),
                     f"data.train={subset}", f"output_dir={run_dir}"])
                metrics = [json.loads(line) for line in
                           (run_dir / "metrics.jsonl").read_text().splitlines()]
                record["exact_match"] = [m["eval_exact_match"] for m in metrics
                                         if "eval_exact_match" in m][-1]
                save(out, results, done, record)
            print(json.dumps(record), flush=True)
    return 0


def table(out: Path, work: Path) -> int:
    """One row per method and budget: what the subset holds (clean on-task, on-task with
    wrong answers, other tasks) and the exact match after training on it."""
    kinds = [json.loads(line)["kind"] for line in LABELS.read_text().splitlines()]
    print("| method | budget | clean on-task | on-task, wrong answers | other tasks "
          "| exact match | selection time |")
    print("|---|---|---|---|---|---|---|")
    for record in json.loads(out.read_text())["runs"]:
        subset = work / f"{record['method']}-{record['budget'].rstrip('%')}.scores.jsonl"
        chosen = [kinds[json.loads(line)["index"]] for line in subset.read_text().splitlines()
                  if json.loads(line)["selected"]]
        shares = [f"{chosen.count(kind) / len(chosen):.1%}"
                  for kind in ("clean", "noisy", "off_task")]
        exact = record.get("exact_match")
        print(f"| {record['method']} | {record['budget']} ({len(chosen)}) | "
              + " | ".join(shares)
              + f" | {'-' if exact is None else f'{exact:.3f}'} | {record['select_s']:.0f} s |")
    return 0


def run(command: list[str]) -> None:
    print("+", " ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def save(out: Path, results: dict, done: dict, record: dict) -> None:
    done[(record["method"], record["budget"])] = record
    results["runs"] = list(done.values())
    out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
