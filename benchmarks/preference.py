"""Preference and reward tuning on the bundled SmolLM2-135M-Instruct (docs/preference.md).

    python benchmarks/preference.py [--parts cost dpo grpo] [--out DIR]

1. `cost`: one train step of SFT and of DPO with the same LoRA (r=16, all linears) on the
   same [chosen; rejected] batch of examples/preference (4 pairs, 96 tokens), side by side
   in this process: XLA's memory analysis of each compiled step and the median step time
   (steps taken round-robin, one of each in turn);
   DPO once with its reference pass (the adapter off) and once with precomputed reference
   log-probs.
2. `dpo`: `python -m jft.train examples/preference/config.yaml`: eval reward accuracy and
   margins before and after, and how often greedy answers to the eval questions take the
   chosen form (the bare number; exact match with the chosen reply).
3. `grpo`: GRPO from the base model on the quickstart date task, group 8, 4 prompts a step,
   12 new tokens, reward `exact_match`, and again with `date_reward:partial` added
   (examples/preference/date_reward.py): exact match before and after, the reward per
   step, seconds per step.

Writes benchmarks/results/preference_<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BARE_NUMBER = re.compile(r"^\s*\d+\s*$")


def cost(args) -> dict:
    import jax
    import optax

    import jft
    from jft.objectives import make_objective
    from jft.objectives.sequences import REFERENCE_FIELD, token_logps
    from jft.peft import create
    from jft.peft.optim import masked_optimizer
    from jft.training.data import DataConfig, batcher, read_split
    from jft.training.step import _train_step, init_state

    model = jft.load("smollm2-135m-instruct")
    data = DataConfig(train=str(ROOT / "examples/preference/train.jsonl"),
                      format="preference", max_length=96, packing=False)
    _, tokens = read_split(data, model.tokenizer)
    batch = next(iter(batcher(tokens, data, model.tokenizer, 4)))
    logps = jax.jit(lambda p, b: token_logps(model.config, p, (), b)[0])(model.params, batch)
    settings = {
        "sft": (make_objective("sft"), batch),
        "dpo (reference pass)": (make_objective("dpo"), batch),
        "dpo (precomputed reference)": (make_objective("dpo"),
                                        {**batch, REFERENCE_FIELD: logps}),
    }
    out = {"batch": {"pairs": 4, "rows": int(batch["tokens"].shape[0]),
                     "length": int(batch["tokens"].shape[1])}}
    runs = {}
    for name, (objective, fed) in settings.items():
        base, adapter = create("lora", jax.random.key(0), model.params, model.config, r=16,
                               alpha=32, targets="all-linear")
        optimizer = masked_optimizer(optax.adamw(1e-4), [adapter])
        state = init_state([adapter], optimizer, 0)
        step = jax.jit(functools.partial(_train_step, objective=objective),
                       static_argnums=(0, 1), donate_argnums=2)
        compiled = step.lower(model.config, optimizer, state, base, fed).compile()
        stats = compiled.memory_analysis()
        out[name] = {"argument_bytes": int(stats.argument_size_in_bytes),
                     "temp_bytes": int(stats.temp_size_in_bytes), "step_times_s": []}
        runs[name] = [compiled, state, base, fed]
    # Round-robin, one step of each in turn: other load on the machine falls on all alike.
    for i in range(args.warmup + args.steps):
        for name, run in runs.items():
            compiled, state, base, fed = run
            start = time.perf_counter()
            run[1], metrics = compiled(state, base, fed)
            jax.block_until_ready(metrics)
            if i >= args.warmup:
                out[name]["step_times_s"].append(time.perf_counter() - start)
    for name in settings:
        out[name]["step_time_s"] = statistics.median(out[name]["step_times_s"])
        print(name, out[name], flush=True)
    sft = out["sft"]
    for name in ("dpo (reference pass)", "dpo (precomputed reference)"):
        out[name]["time_vs_sft"] = out[name]["step_time_s"] / sft["step_time_s"]
        out[name]["temp_vs_sft"] = out[name]["temp_bytes"] / sft["temp_bytes"]
    return out


def _train(config: str, output: Path, *overrides, cwd=ROOT, reuse=False
           ) -> tuple[list[dict], float | None]:
    """The run's metrics, training it first unless `reuse` finds it finished."""
    seconds = None
    if not (reuse and (output / "metrics.jsonl").exists()):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "jft.train", config, f"output_dir={output}",
                        *overrides, "--overwrite"], check=True, cwd=cwd)
        seconds = time.perf_counter() - start
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()], \
        seconds


def _generations(run: Path) -> dict[int, list[dict]]:
    by_step: dict[int, list[dict]] = {}
    for line in (run / "eval_generations.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_step.setdefault(row["step"], []).append(row)
    return by_step


def dpo(args) -> dict:
    run = args.out / "dpo"
    records, seconds = _train("examples/preference/config.yaml", run, reuse=args.reuse)
    before = json.loads((run / "eval_before.json").read_text())
    after = [r for r in records if "eval_loss" in r][-1]
    generations = _generations(run)
    first, last = min(generations), max(generations)

    def form(rows):
        return {"chosen_form": sum(bool(BARE_NUMBER.match(r["generated"])) for r in rows)
                / len(rows), "exact_match": sum(r["match"] for r in rows) / len(rows),
                "examples": [r["generated"] for r in rows[:4]]}

    keys = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins",
            "eval_logps/chosen", "eval_logps/rejected")
    return {"seconds": seconds, "steps": records[-1]["step"],
            "before": {k: before.get(k) for k in keys} | form(generations[first]),
            "after": {k: after.get(k) for k in keys} | form(generations[last]),
            "train_curve": [{k: r[k] for k in ("step", "loss", "rewards/accuracies",
                                                "rewards/margins") if k in r}
                            for r in records]}


def grpo(args) -> dict:
    out = {}
    variants = {
        "exact_match": ["objective.reward=exact_match"],
        "exact_match+partial": ["objective.reward=[exact_match,date_reward:partial]"],
    }
    for name in args.grpo_rewards:
        reward = variants[name]
        run = args.out / f"grpo_{name}"
        records, seconds = _train(
            str(ROOT / "examples/quickstart/config.yaml"), run, "objective.name=grpo",
            *reward, "objective.group_size=8", "objective.max_new_tokens=12",
            f"train.steps={args.grpo_steps}", "train.batch_size=4",
            "train.learning_rate=5e-4", "train.warmup_steps=0", "train.log_every=1",
            f"eval.every={args.grpo_steps}", "eval.max_examples=32",
            f"checkpoint.every={args.grpo_steps}",
            f"data.train={ROOT / 'examples/quickstart/train.jsonl'}",
            f"data.eval={ROOT / 'examples/quickstart/eval.jsonl'}",
            cwd=ROOT / "examples/preference", reuse=args.reuse)
        before = json.loads((run / "eval_before.json").read_text())
        after = [r for r in records if "eval_exact_match" in r][-1]
        timed = [r["step_time_s"] for r in records if "step_time_s" in r]
        out[name] = {
            "seconds": seconds, "exact_match_before": before["eval_exact_match"],
            "exact_match_after": after["eval_exact_match"],
            "reward_per_step": [round(r["reward"], 4) for r in records],
            "kl_per_step": [round(r["kl"], 5) for r in records],
            "median_step_time_s": statistics.median(timed),
        }
        print(name, out[name], flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["cost", "dpo", "grpo"],
                        choices=["cost", "dpo", "grpo"])
    parser.add_argument("--out", type=Path, default=Path("/tmp/jft_preference_benchmark"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--grpo-steps", type=int, default=20)
    parser.add_argument("--grpo-rewards", nargs="+", default=["exact_match",
                                                                "exact_match+partial"])
    parser.add_argument("--reuse", action="store_true",
                        help="summarise finished runs in --out instead of training again")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    path = ROOT / f"benchmarks/results/preference_{date}.json"
    # Each part is merged into the day's file as it ends: the parts take long on a CPU.
    results = json.loads(path.read_text()) if path.exists() else {"date": date}
    for part in args.parts:
        found = globals()[part](args)
        results[part] = {**results.get(part, {}), **found} if part == "grpo" else found
        results.setdefault("commands", {})[part] = " ".join(sys.argv)
        path.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {part} to {path}", flush=True)


if __name__ == "__main__":
    main()
