"""Merging methods on real fine-tunes: per-task exact match and general perplexity of each
single adapter and of each merge of them, on the bundled SmolLM2-135M.

    python benchmarks/merging.py --adapters RUN/stages/01-date_dmy/adapter ... \
        --tasks date_dmy date_words date_compact --json benchmarks/results/merging_cpu.json

The adapters are LoRAs each trained on one task alone over the base (the per-task
adapters of `python -m jft.continual examples/continual/config.yaml
continual.strategy=conpet`, whose dynamic mode trains a fresh adapter per task). Each
task is scored on examples/continual/<task>/eval.jsonl (greedy, exact match), and the
general perplexity on examples/continual/general.jsonl. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "continual"


def merges(count: int) -> dict[str, tuple[str, dict]]:
    """name -> (method, options) of the merges compared; weights 1 each unless given."""
    mean = [1.0 / count] * count
    return {
        "linear (mean)": ("linear", {"weights": mean}),
        "linear (sum)": ("linear", {}),
        "ties d=0.2": ("ties", {"density": 0.2}),
        "ties d=0.5": ("ties", {"density": 0.5}),
        "dare_linear d=0.3": ("dare_linear", {"density": 0.3}),
        "dare_ties d=0.3": ("dare_ties", {"density": 0.3}),
        "magnitude_prune d=0.3": ("magnitude_prune", {"density": 0.3}),
        "breadcrumbs d=0.3": ("breadcrumbs", {"density": 0.3}),
        "della d=0.3": ("della", {"density": 0.3}),
        "lines": ("lines", {}),
        "cat": ("cat", {}),
        "svd r=16": ("svd", {"svd_rank": 16}),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", nargs="+", type=Path, required=True)
    parser.add_argument("--tasks", nargs="+", required=True)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import jft
    from jft.api import Model
    from jft.merging.api import merge

    model = jft.load("smollm2-135m-instruct", dtype="float32", compute_dtype="float32")
    evaluate = _evaluator(model, args.tasks)
    rows = {"base": evaluate(model)}
    for task, adapter in zip(args.tasks, args.adapters, strict=True):
        rows[f"{task} adapter alone"] = evaluate(
            Model(model.config, model.params, model.tokenizer, model.source,
                  jft.load("smollm2-135m-instruct", dtype="float32", compute_dtype="float32",
                           adapter=adapter).adapters))
    for name, (method, options) in merges(len(args.adapters)).items():
        started = time.perf_counter()
        weights = options.pop("weights", None)
        result = merge(model, args.adapters, method, weights, **options)
        seconds = time.perf_counter() - started
        merged = Model(model.config, result.params if result.params is not None
                       else model.params, model.tokenizer, model.source,
                       [result.adapter] if result.adapter is not None else [])
        rows[name] = evaluate(merged) | {"merge_s": seconds}
        print(name, rows[name], file=sys.stderr, flush=True)
    # Forgetting by negation: every task vector, minus the first task's again.
    negated = merge(model, [*args.adapters, args.adapters[0]], "linear",
                    [1.0] * len(args.adapters) + [-1.0])
    rows[f"linear (sum) minus {args.tasks[0]}"] = evaluate(
        Model(model.config, negated.params, model.tokenizer, model.source, []))
    print(_table(rows, args.tasks))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def _evaluator(model, tasks):
    from jft.inference.generation import generate_tokens
    from jft.objectives.sft import SFT
    from jft.training.data import DataConfig, batcher, exact_match, prompt_ids, read_split

    examples = {}
    for task in tasks:
        lines = (EXAMPLES / task / "eval.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        examples[task] = ([prompt_ids(model.tokenizer, r["prompt"]) for r in records],
                          [r["completion"] for r in records])
    general = DataConfig(train=str(EXAMPLES / "general.jsonl"), format="text", max_length=64)
    _, general_tokens = read_split(general, model.tokenizer)
    held_out = jax.jit(lambda params, adapters, batch: SFT.held_out(
        model.config, params, adapters, batch))
    stop = sorted(set(model.tokenizer.stop_ids))

    def evaluate(candidate) -> dict:
        out = {}
        for task, (prompts, references) in examples.items():
            generated = generate_tokens(candidate.config, candidate.params, prompts, 12, stop,
                                        adapters=candidate.adapters)
            out[task] = float(np.mean([exact_match(model.tokenizer.decode(ids), ref)
                                       for ids, ref in zip(generated, references,
                                                           strict=True)]))
        total = count = 0.0
        for batch in batcher(general_tokens, general, model.tokenizer, 8, split="eval"):
            loss, targets, _ = held_out(candidate.params, tuple(candidate.adapters), batch)
            total, count = total + float(loss), count + int(targets)
        out["general_ppl"] = float(np.exp(total / count))
        return out

    return evaluate


def _table(rows: dict, tasks) -> str:
    head = ["model", *tasks, "mean", "general ppl"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        scores = [row[t] for t in tasks]
        lines.append("| " + " | ".join([name, *(f"{s:.3f}" for s in scores),
                                         f"{np.mean(scores):.3f}",
                                         f"{row['general_ppl']:.2f}"]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
