"""`python -m jft.select active CONFIG.yaml`: active learning with LoRA (STAR: Zhang et
al., ACL 2024, "Constraint LoRA with dynamic active learning").

Rounds of: train a LoRA adapter on the labelled set (a `jft.train` run of its own, from
scratch, as STAR's code does) and evaluate it; score the unlabelled rest of the pool by
uncertainty; buy the labels of the `per_round` most uncertain (here they come from the
pool file, as an annotator's would); repeat. The first labelled set is `initial` records
drawn at random.

Uncertainty is the model's about its own answer, so no label is read before it is
bought: the prompt's greedy completion is generated, then scored by the mean predictive
entropy of its tokens (`uncertainty: entropy`) or their mean negative log-likelihood
(`nll`, STAR's PE). Strategies:

- `star`: STAR's dynamic uncertainty w·U_full + (1 − w)·U_base, each min-max normalised
  over the unlabelled pool. U_base is the base model's (computed once), U_full the
  trained adapter's, averaged over `mc_samples` passes with the LoRA dropout on
  (Monte-Carlo dropout); w grows linearly with the rounds (STAR: 0.1 per round of 10),
  here w = round / rounds. Its calibration regulariser is the training config's: weight
  decay on LoRA's B alone (`train.weight_decay: 0.5`, `train.weight_decay_on: [b]`).
- `uncertainty`: the trained adapter's uncertainty alone (one pass, no dropout).
- `random`: the same number of labels drawn at random: the baseline.

The run directory holds config.yaml, active.json (every round's labelled count, eval
loss and exact match, and the records it bought) and rounds/NN/ (labelled.jsonl in the
pool's format, the round's training run, and the scores of the unlabelled pool). A
finished round is not redone: rerun the same command to continue.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from jft.errors import JftError

RESULTS_FILE = "active.json"
STRATEGIES = ("star", "uncertainty", "random")
UNCERTAINTIES = ("entropy", "nll")


@dataclasses.dataclass(frozen=True)
class ActiveConfig:
    """The keys of an active-learning config (docs/selection.md)."""

    model: str
    pool: str
    train: dict  # a jft.train config: its model, data.train, train.steps and output_dir are set
    output_dir: str
    format: str = "auto"
    strategy: str = "star"
    uncertainty: str = "entropy"
    initial: int = 16
    per_round: int = 16
    rounds: int = 5
    epochs: float = 3.0
    mc_samples: int = 3
    max_new_tokens: int = 32
    max_length: int = 512
    batch_size: int = 16
    seed: int = 0


def load_active_config(path: str, overrides: list[str] = ()) -> ActiveConfig:
    """The config file with `key=value` overrides of its top-level keys (values as YAML)."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise JftError(f"config file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise JftError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(raw, dict):
        raise JftError(f"{path}: expected a mapping of keys at the top level")
    for override in overrides:
        key, equals, value = override.partition("=")
        if not equals or not key:
            raise JftError(f"override {override!r}: expected key=value, e.g. strategy=random")
        raw[key] = yaml.safe_load(value)
    fields = {f.name: f for f in dataclasses.fields(ActiveConfig)}
    for key in raw:
        if key not in fields:
            raise JftError(f"{path}: unknown key {key!r}; valid keys: {', '.join(fields)}")
    for name, field in fields.items():
        if name not in raw and field.default is dataclasses.MISSING:
            raise JftError(f"{path}: missing required key {name!r}")
    train = raw.get("train")
    if isinstance(train, str):  # a jft.train config file, relative to this one
        train_path = (Path(path).parent / train) if not Path(train).is_absolute() else Path(train)
        try:
            train = yaml.safe_load(train_path.read_text())
        except (OSError, yaml.YAMLError) as error:
            raise JftError(f"{path}: train: cannot read {train_path} ({error})") from None
    if not isinstance(train, dict):
        raise JftError(f"{path}: train: expected a jft.train config (a mapping or a file)")
    config = ActiveConfig(**{**raw, "train": train})
    _check(config, path)
    return config


def _check(config: ActiveConfig, path: str) -> None:
    def fail(key, message):
        raise JftError(f"{path}: {key}: {message}")

    if config.strategy not in STRATEGIES:
        fail("strategy", f"{config.strategy!r}; valid: {', '.join(STRATEGIES)}")
    if config.uncertainty not in UNCERTAINTIES:
        fail("uncertainty", f"{config.uncertainty!r}; valid: {', '.join(UNCERTAINTIES)}")
    for key in ("initial", "per_round", "rounds", "mc_samples", "max_new_tokens", "batch_size"):
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            fail(key, f"{value!r}; expected an integer >= 1")
    if not isinstance(config.epochs, int | float) or config.epochs <= 0:
        fail("epochs", f"{config.epochs!r}; expected a number > 0")
    method = config.train.get("method") or {}
    dropout = method.get("dropout", 0.0) if isinstance(method, dict) else 0.0
    if not (config.train.get("data") or {}).get("eval"):
        fail("train.data.eval", "every round is evaluated: give the eval file of the task")
    if config.strategy == "star" and config.mc_samples > 1 and not dropout:
        fail("mc_samples", f"{config.mc_samples} Monte-Carlo passes need the LoRA dropout on: "
             "set train.method.dropout (STAR: 0.1), or mc_samples: 1")


def main(argv: list[str]) -> int:
    from jft.generate import ArgumentParser

    parser = ArgumentParser(prog="python -m jft.select active",
                            description="Active learning with LoRA (STAR); see "
                                        "docs/selection.md.")
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="top-level key=value, e.g. "
                        "strategy=random output_dir=runs/active-random")
    args = parser.parse_args(argv)
    import datasets

    datasets.disable_progress_bars()
    ActiveLearning(load_active_config(args.config, args.overrides)).run()
    return 0


class ActiveLearning:
    def __init__(self, config: ActiveConfig):
        import jft
        from jft.select.pool import read_pool
        from jft.train import _status_line

        self.config = config
        self.directory = Path(config.output_dir)
        self.directory.mkdir(parents=True, exist_ok=True)
        recorded = self.directory / "config.yaml"
        resolved = yaml.safe_dump(dataclasses.asdict(config), sort_keys=True)
        if recorded.exists() and recorded.read_text() != resolved:
            raise JftError(f"{self.directory}: holds an active-learning run of another config; "
                           "give another output_dir")
        recorded.write_text(resolved)
        with _status_line(f"loading model {config.model}"):
            self.model = jft.load(config.model)
        with _status_line(f"reading {config.pool}"):
            self.pool = read_pool(config.pool, config.format, self.model.tokenizer,
                                  config.max_length)
        if self.pool.prompts is None:
            raise JftError(f"{config.pool}: format text has no prompts to answer; active "
                           "learning needs prompt_completion or chat data")
        if config.initial + (config.rounds - 1) * config.per_round > len(self.pool):
            raise JftError(f"{config.pool}: {len(self.pool)} records, fewer than initial + "
                           "(rounds - 1) x per_round labels")

    def run(self) -> dict:
        config = self.config
        results = self._results()
        labelled = self._labelled(results)
        for round_number in range(len(results["rounds"]) + 1, config.rounds + 1):
            folder = self.directory / "rounds" / f"{round_number:02d}"
            metrics, adapter_run = self._train(folder, labelled)
            entry = {"round": round_number, "labelled": len(labelled), **metrics}
            if round_number < config.rounds:
                bought = self._query(folder, labelled, adapter_run, round_number)
                entry["bought"] = bought.tolist()
                labelled = np.concatenate([labelled, bought])
            results["rounds"].append(entry)
            self._save(results)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            print(f"round {round_number}: {entry['labelled']} labels, {shown}", flush=True)
        return results

    # ------------------------------------------------------------------ the steps

    def _labelled(self, results) -> np.ndarray:
        config = self.config
        first = np.random.default_rng(config.seed).choice(len(self.pool), config.initial,
                                                          replace=False)
        bought = [np.asarray(r.get("bought", []), np.int64) for r in results["rounds"]]
        return np.concatenate([np.sort(first), *bought]).astype(np.int64)

    def _train(self, folder: Path, labelled: np.ndarray) -> tuple[dict, Path]:
        from jft.select.pool import subset_file
        from jft.select.training import steps_for, train_run

        config = self.config
        data = subset_file(self.pool.path, labelled, folder, "labelled")
        raw = json.loads(json.dumps(config.train))
        raw["model"] = config.model
        train = raw.setdefault("train", {})
        train["steps"] = steps_for(len(labelled), train.get("batch_size", 8), config.epochs)
        train.setdefault("seed", config.seed)
        eval_section = raw.setdefault("eval", {})
        eval_section["every"] = train["steps"]  # evaluated once, when the round has trained
        run = train_run(raw, data, folder / "run", f"{folder}")
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in records if "eval_loss" in r or "eval_exact_match" in r]
        metrics = {k: v for k, v in (last[-1] if last else {}).items()
                   if k in ("eval_loss", "eval_exact_match")}
        return metrics, run

    def _query(self, folder: Path, labelled: np.ndarray, run: Path, round_number: int
               ) -> np.ndarray:
        """The `per_round` unlabelled records to label next."""
        config = self.config
        unlabelled = np.setdiff1d(np.arange(len(self.pool)), labelled)
        if config.strategy == "random":
            rng = np.random.default_rng([config.seed, round_number])
            return np.sort(rng.choice(unlabelled, config.per_round, replace=False))
        from jft.formats.adapters import load_adapter

        params, adapters = load_adapter(run, self.model.params, self.model.config)
        samples = config.mc_samples if config.strategy == "star" else 1
        full = self._uncertainty(params, adapters, unlabelled, samples, round_number)
        scores = full
        if config.strategy == "star":
            weight = round_number / config.rounds
            base = self._base_uncertainty()[unlabelled]
            scores = weight * _min_max(full) + (1 - weight) * _min_max(base)
        np.save(folder / "scores.npy", np.stack([unlabelled, scores]), allow_pickle=False)
        order = np.lexsort((unlabelled, -scores))
        return np.sort(unlabelled[order[:config.per_round]])

    def _uncertainty(self, params, adapters, rows, samples: int, seed: int) -> np.ndarray:
        """The model's uncertainty about its own greedy answer to each prompt in `rows`."""
        from jft.select.features import generated_examples, target_uncertainty
        from jft.training.data import TokenizedExamples

        config, model = self.config, self.model
        prompts = TokenizedExamples.from_examples(self.pool.prompts[int(i)] for i in rows)
        answers = generated_examples(model.config, params, adapters, prompts, model.stop_ids,
                                     max_new_tokens=config.max_new_tokens,
                                     batch_size=config.batch_size, desc="answering")
        values = target_uncertainty(model.config, params, adapters, answers,
                                    batch_size=config.batch_size, samples=samples,
                                    seed=seed, desc="uncertainty")
        return values[config.uncertainty]

    def _base_uncertainty(self) -> np.ndarray:
        """The base model's uncertainty over the whole pool, computed once per run."""
        path = self.directory / "base_uncertainty.npy"
        if path.exists():
            return np.load(path, allow_pickle=False)
        values = self._uncertainty(self.model.params, (), np.arange(len(self.pool)), 1, 0)
        partial = path.with_name("base_uncertainty.partial.npy")
        np.save(partial, values, allow_pickle=False)
        os.replace(partial, path)
        return values

    # ------------------------------------------------------------------ results

    def _results(self) -> dict[str, Any]:
        path = self.directory / RESULTS_FILE
        if path.exists():
            return json.loads(path.read_text())
        return {"strategy": self.config.strategy, "rounds": []}

    def _save(self, results: dict) -> None:
        path = self.directory / RESULTS_FILE
        partial = path.with_name(RESULTS_FILE + ".partial")
        partial.write_text(json.dumps(results, indent=1) + "\n")
        os.replace(partial, path)
        print(f"wrote {path}", file=sys.stderr)


def _min_max(values: np.ndarray) -> np.ndarray:
    """values scaled to [0, 1] (STAR's normalize_list); all equal: zeros."""
    values = np.asarray(values, np.float64)
    spread = values.max() - values.min()
    return (values - values.min()) / spread if spread > 0 else np.zeros_like(values)
