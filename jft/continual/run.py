"""A continual run: the tasks trained in order, every task and the general text evaluated
after each stage, and `continual.json` kept up to date.

Layout of the run directory:

    config.yaml            the resolved continual config (and its fingerprint)
    continual.json         tasks, matrix, initial scores, general_ppl, summary metrics
    heatmap.png, general_ppl.png
    selector.safetensors   ConPET (dynamic) only: the latest task selector
    stages/NN-task/        one `jft.train` run per stage (config.yaml, metrics.jsonl,
                           tensorboard/, checkpoints/), plus adapter/ (the stage's trained
                           adapter, jft's format), generations.jsonl and evaluation.json

A stage whose evaluation.json exists is done; one with checkpoints resumes from them
exactly (deltas, optimiser, data position, RNG); what later stages start from (the
merged base, the frozen adapters, the replay buffer) is rebuilt from the finished
stages, so a run killed anywhere continues where it was.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jft.continual.config import ContinualConfig
from jft.continual.inference import RESULTS_FILE
from jft.errors import JftError
from jft.train import Run, _eval_examples, _status_line

INITIAL_FILE = "initial.json"
EVALUATION_FILE = "evaluation.json"
GENERATIONS_FILE = "generations.jsonl"
ADAPTER_DIR = "adapter"
HEATMAP_FILE = "heatmap.png"
GENERAL_PLOT_FILE = "general_ppl.png"


class StageRun(Run):
    """One stage: `jft.train`'s loop, checkpoints and logs, over what the continual run
    hands it (the model, a base, the adapters, the objective and the batches)."""

    def __init__(self, config, run: ContinualRun, base, adapters, objective, batches):
        from jft.training.checkpoints import base_fingerprint
        from jft.training.run_dir import RunDirectory

        self._begin(config, run.rules)
        # The continual run's lock covers its stages' folders.
        claim = RunDirectory(config.output_dir, config.fingerprint(), False, lock=False)
        claim.commit(config.to_dict())
        resuming = claim.resuming
        self.model, self.model_config = run.model, run.model_config
        self.base_hash = base_fingerprint(base)
        self.batcher, self.eval_batches, self.eval_examples = batches, None, []
        self._set_up_training(base, adapters, objective)
        self._open_checkpoints(resuming)

    @property
    def finished(self) -> bool:
        return self.start_step >= self.config.train.steps

    def _summary(self, step, records, tokens_per_s) -> str:
        rate = f", {tokens_per_s:.0f} tokens/s" if tokens_per_s else ""
        loss = f", loss {records[-1]['loss']:.4g}" if records else ""
        return f"stage {self.directory.name}: step {step} of {self.config.train.steps}{loss}{rate}"


@dataclasses.dataclass
class Carried:
    """What the next stage starts from: the base, the adapter carried on (`carry`), and
    the adapters kept (frozen in the stack, or ConPET's experts) with the base each
    trained over."""

    base: dict
    adapter: object | None = None
    kept: list = dataclasses.field(default_factory=list)


class ContinualRun:
    def __init__(self, config: ContinualConfig, overwrite: bool = False):
        import jft
        from jft.continual.strategies import STRATEGIES
        from jft.sharding import make_rules
        from jft.training.run_dir import RunDirectory

        self.started = time.perf_counter()
        self.config = config
        self.directory = config.output_dir
        self.strategy = STRATEGIES[config.continual.strategy]
        self.options = config.continual.options
        self.memo: dict = {}  # what strategies compute once per run (GeRe, ConPET)
        train = config.base
        self.claim = RunDirectory(self.directory, config.fingerprint(), overwrite)
        try:
            self.rules = make_rules(train.mesh.mesh_config())
            with _status_line(f"loading model {train.model}"):
                self.model = jft.load(train.model, dtype=train.model_dtype,
                                      compute_dtype=train.compute_dtype, rules=self.rules)
            self.model_config = self.model.config.replace(remat=train.remat,
                                                          kernels=train.kernels)
            self.original = self.model.params
            self.model.params = None  # the stages hold the bases they train over
            self.tokenizer = self.model.tokenizer
            with _status_line("reading and tokenizing the tasks"):
                self._read_tasks()
            self.claim.commit(config.to_dict())
        except BaseException:
            self.claim.release()
            raise

    # ------------------------------------------------------------------ data

    def _read_tasks(self):
        from jft.training.data import DataConfig, read_split

        self.train_tokens, self.eval_examples = [], []
        for index in range(len(self.config.tasks)):
            stage = self.config.stage(index)
            _, tokens = read_split(stage.data, self.tokenizer)
            self.train_tokens.append(tokens)
            records, _ = read_split(stage.data, self.tokenizer, "eval")
            self.eval_examples.append(_eval_examples(records, self.tokenizer, stage.data,
                                                     stage.eval))
        self.general_tokens = None
        if self.config.general:
            data = self.config.base.data
            self.general_data = DataConfig(train=self.config.general, format="text",
                                           max_length=data.max_length, packing=data.packing,
                                           overlong=data.overlong)
            _, self.general_tokens = read_split(self.general_data, self.tokenizer)

    def task_prompts(self, index: int) -> list[list[int]]:
        """The prompt ids of task `index`'s training examples: the tokens before the first
        training target."""
        tokens = self.train_tokens[index]
        out = []
        for i in range(len(tokens)):
            ids, mask = tokens.arrays(i)
            first = int(np.argmax(mask)) if mask.any() else len(ids)
            out.append(ids[:max(first, 1)].tolist())
        return out

    # ------------------------------------------------------------------ the stages

    def run(self) -> int:
        """Trains and evaluates the stages in turn, then releases the run directory."""
        try:
            return self._run()
        finally:
            self.claim.release()

    def _run(self) -> int:
        tasks = self.config.tasks
        carried = Carried(self.original)
        for index, task in enumerate(tasks):
            stage_config = self.config.stage(
                index, self.strategy.stage_method(self.config, self.options, index))
            directory = Path(stage_config.output_dir)
            done = (directory / EVALUATION_FILE).exists()
            print(f"stage {index + 1} of {len(tasks)}: {task.name}"
                  f"{' (done)' if done else ''}", file=sys.stderr, flush=True)
            started = time.perf_counter()
            stage = self._stage(index, stage_config, carried)
            if index == 0 and not (self.directory / INITIAL_FILE).exists():
                initial = self._evaluate(stage, -1, stage.state.adapters, carried)
                _write_json(self.directory / INITIAL_FILE, initial)
            if not stage.finished:
                stage.train()
                if stage.last_saved != stage_config.train.steps:  # stopped by a signal
                    print(f"stopped in stage {index + 1} ({task.name}); run the same command "
                          "to resume", file=sys.stderr)
                    return 0
            trained = stage.adapter
            if not done:
                self._save_adapter(trained, directory)
            carried = self._carry(stage, trained, carried)
            if not done:
                extras = self.strategy.after_stage(self, self.options, index)
                result = self._evaluate(stage, index, stage.state.adapters, carried)
                result |= {"task": task.name, "steps": stage_config.train.steps,
                           "trainable_params": trained.impl.num_params(
                               trained.delta, self.model_config, trained.config),
                           "seconds": time.perf_counter() - started, **extras}
                _write_json(directory / EVALUATION_FILE, result)
            self.write_results()
        print(f"done: {len(tasks)} tasks; results in {self.directory / RESULTS_FILE}",
              file=sys.stderr)
        print(json.dumps({k: v for k, v in _read_json(self.directory / RESULTS_FILE).items()
                          if k in ("average_accuracy", "bwt", "fwt", "forgetting")}))
        return 0

    def _stage(self, index: int, stage_config, carried: Carried) -> StageRun:
        from jft.continual.mixing import MixedBatcher
        from jft.training.data import batcher

        train = stage_config.train
        replay = self.strategy.replay(self, self.options, index)
        rows = train.batch_size - (replay.rows if replay else 0)
        batches = batcher(self.train_tokens[index], stage_config.data, self.tokenizer, rows,
                          train.seed)
        if replay is not None:  # tokenized already: only the shared batching settings apply
            batches = MixedBatcher(batches, batcher(replay.examples, stage_config.data,
                                                    self.tokenizer, replay.rows, train.seed))
        base, adapters = self._stage_adapters(index, stage_config, carried)
        objective = self.strategy.objective(self, self.options, index)
        with _status_line(f"setting up stage {index + 1} ({stage_config.method.name})"):
            return StageRun(stage_config, self, base, adapters, objective, batches)

    def _stage_adapters(self, index: int, stage_config, carried: Carried):
        from jft.peft import create
        from jft.training.data import batcher

        mode = self.strategy.carry(self.options)
        if mode == "carry" and carried.adapter is not None:
            return carried.base, [carried.adapter]
        method, train = stage_config.method, stage_config.train
        calibration = None
        if method.needs_calibration:
            batches = batcher(self.train_tokens[index], stage_config.data, self.tokenizer,
                              train.batch_size, train.seed + 1)
            calibration = [next(batches) for _ in range(method.calibration_batches)]
        base = self.original if mode in ("stack", "separate") else carried.base
        base, adapter = create(method.name, jax.random.key(train.seed), base,
                               self.model_config, calibration, method.config)
        if mode == "stack":
            return base, [*carried.kept, adapter]
        return base, [adapter]

    def _carry(self, stage: StageRun, trained, carried: Carried) -> Carried:
        """What the next stage starts from, after `stage` trained `trained`."""
        mode = self.strategy.carry(self.options)
        if mode == "carry":
            return Carried(stage.base, trained)
        if mode == "merge":
            return Carried(trained.impl.merge(stage.base, trained.delta, self.model_config,
                                              trained.config))
        if mode == "stack":
            frozen = dataclasses.replace(trained, frozen=True)
            return Carried(stage.base, kept=[*carried.kept, frozen])
        return Carried(self.original, kept=[*carried.kept, (stage.base, trained)])

    def _save_adapter(self, adapter, directory: Path):
        from jft.formats.jft_adapter import save_jft_adapter

        delta, config = adapter.impl.split(adapter.delta, self.model_config, adapter.config)
        target = directory / ADAPTER_DIR
        target.mkdir(exist_ok=True)
        save_jft_adapter(dataclasses.replace(adapter, delta=delta, config=config, frozen=False),
                         self.model_config, target, self.config.base.model)

    # ------------------------------------------------------------------ evaluation

    def _evaluate(self, stage: StageRun, index: int, adapters, carried: Carried) -> dict:
        """Every task's score and the general perplexity of the model after stage `index`
        (-1: the initial model); generations go to the stage's generations.jsonl."""
        from jft.continual.scoring import score

        label = "the initial model" if index < 0 else f"after stage {index + 1}"
        scores, rows = [], []
        with _status_line(f"evaluating {label} on {len(self.config.tasks)} tasks"):
            for j, task in enumerate(self.config.tasks):
                examples = self.eval_examples[j]
                texts = self._generate(stage, index, adapters, carried,
                                       [e.ids for e in examples])
                values = [score(task.metric, text, e.reference)
                          for text, e in zip(texts, examples, strict=True)]
                scores.append(float(np.mean(values)) if values else 0.0)
                rows += [{"stage": index + 1, "task": task.name, "prompt": e.prompt,
                          "reference": e.reference, "generated": text, "score": value}
                         for e, text, value in zip(examples, texts, values, strict=True)]
            general = self._general_perplexity(stage, index, adapters, carried)
        directory = self.directory if index < 0 else Path(stage.directory)
        with open(directory / GENERATIONS_FILE, "w") as file:
            file.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"{label}: " + ", ".join(f"{t.name} {s:.3f}" for t, s in
                                       zip(self.config.tasks, scores, strict=True))
              + (f", general ppl {general:.3f}" if general is not None else ""), flush=True)
        return {"scores": scores, "general_ppl": general}

    def _routes(self, stage, index: int, prompts, adapters, carried: Carried):
        """[(base, adapters, row indices)] answering `prompts` after stage `index`."""
        routes = None if index < 0 else self.strategy.route(self, self.options, index, prompts)
        if routes is None:
            return [(stage.base, adapters, list(range(len(prompts))))]
        groups = []
        for expert, (base, adapter) in enumerate(carried.kept):
            rows = [i for i, r in enumerate(routes) if r == expert]
            if rows:
                groups.append((base, [adapter], rows))
        return groups

    def _generate(self, stage, index, adapters, carried, prompts) -> list[str]:
        from jft.inference.generation import generate_tokens

        max_new = stage.config.eval.max_new_tokens
        stop = sorted(set(self.tokenizer.stop_ids))
        texts = [""] * len(prompts)
        for base, group_adapters, rows in self._routes(stage, index, prompts, adapters,
                                                       carried):
            out = generate_tokens(self.model_config, base, [prompts[i] for i in rows], max_new,
                                  stop, adapters=group_adapters)
            for i, ids in zip(rows, out, strict=True):
                texts[i] = self.tokenizer.decode(ids)
        return texts

    def _general_perplexity(self, stage, index, adapters, carried) -> float | None:
        from jft.continual.mixing import gather
        from jft.training.data import batcher

        if self.general_tokens is None:
            return None
        tokens = self.general_tokens
        prompts = [tokens.arrays(i)[0].tolist() for i in range(len(tokens))]
        total, count = 0.0, 0
        batch_size = stage.config.eval.batch_size or stage.config.train.batch_size
        for base, group_adapters, rows in self._routes(stage, index, prompts, adapters,
                                                       carried):
            subset = gather([tokens], [(0, i) for i in rows])
            for batch in batcher(subset, self.general_data, self.tokenizer, batch_size,
                                 split="eval"):
                loss, targets, _ = stage.steps.eval(base, group_adapters, batch)
                total, count = total + float(loss), count + int(targets)
        return float(np.exp(min(total / max(count, 1), 50.0)))

    # ------------------------------------------------------------------ results

    def stage_results(self) -> list[dict]:
        out = []
        for index in range(len(self.config.tasks)):
            path = self.config.stage_dir(index) / EVALUATION_FILE
            if not path.exists():
                break
            out.append(_read_json(path))
        return out

    def write_results(self):
        """continual.json, the heatmap and the general-perplexity plot, from what the
        stages recorded so far."""
        from jft.continual.metrics import summary, write_general_plot, write_heatmap

        names = [t.name for t in self.config.tasks]
        initial = _read_json(self.directory / INITIAL_FILE)
        stages = self.stage_results()
        matrix = [s["scores"] for s in stages]
        general = [initial.get("general_ppl")] + [s["general_ppl"] for s in stages]
        method = self.config.base.method.name
        record = {
            "tasks": names, "strategy": self.config.continual.strategy, "method": method,
            "metrics": [t.metric for t in self.config.tasks],
            "matrix": matrix, "initial": initial.get("scores"),
            "general_ppl": general if self.general_tokens is not None else None,
            **summary(matrix, initial.get("scores")),
            "seconds": sum(s["seconds"] for s in stages),
            "trainable_params": max((s["trainable_params"] for s in stages), default=0),
            "stages": [{k: v for k, v in s.items() if k not in ("scores", "general_ppl")}
                       for s in stages],
        }
        _write_json(self.directory / RESULTS_FILE, record)
        if matrix:
            write_heatmap(self.directory / HEATMAP_FILE, names, matrix)
        if self.general_tokens is not None:
            write_general_plot(self.directory / GENERAL_PLOT_FILE, names, general)


def _write_json(path: Path, value):
    partial = path.with_name(path.name + ".partial")  # never a half-written file
    partial.write_text(json.dumps(value, indent=2) + "\n")
    partial.replace(path)


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise JftError(f"{path}: not valid JSON ({error}); remove it to redo that step"
                       ) from None
