"""`conpet`: continual parameter-efficient tuning (Song et al. 2023, arXiv 2309.14763).

`static`: one adapter carried through the tasks, trained on ConPET's dynamic replay:
every batch is half new (the task's) and half old, the old rows drawn from a memory of
`memory_per_task` examples of each earlier task (so each old task is replayed equally
often and a stage's cost does not grow with the number of tasks).

`dynamic`: a separate adapter per task (each over the base alone, frozen once its task
ends), and a selector that routes an input to the task whose adapter should answer: a
classifier over task ids on the base model's prompt features (`jft.continual.selector`),
refitted after each task on the memory of every task seen so far (ConPET's top-1
routing); its accuracy on the seen tasks' eval prompts is reported per stage.
`python -m jft.generate --continual RUN` and `jft.load(..., adapter=RUN)` route the same
way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from jft.continual.mixing import gather, per_task, replay_rows
from jft.continual.strategies.base import Replay, Strategy, register
from jft.continual.strategies.replay import check_batch
from jft.training.config import _field

SELECTOR_FILE = "selector.safetensors"


class Conpet(Strategy):
    name = "conpet"

    @dataclass(frozen=True)
    class Options:
        mode: Literal["static", "dynamic"] = "dynamic"
        memory_per_task: int = _field(50, min=1)  # exemplars kept of each task
        ratio: float = _field(0.5, above=0.0, below=1.0)  # static: old rows (1:1 new:old)
        selector_steps: int = _field(300, min=1)
        selector_learning_rate: float = _field(0.1, above=0.0)

    def check(self, config, context):
        if config.continual.options.mode == "static":
            check_batch(config, context)

    def carry(self, options):
        return "carry" if options.mode == "static" else "separate"

    def replay(self, run, options, index):
        if options.mode != "static" or index == 0:
            return None
        sizes = [len(tokens) for tokens in run.train_tokens[:index]]
        pairs = per_task(sizes, options.memory_per_task, run.config.base.train.seed)
        return Replay(gather(run.train_tokens, pairs),
                      replay_rows(run.config.base.train.batch_size, options.ratio))

    def after_stage(self, run, options, index):
        """Fits the selector on the memory of tasks 0..index; its eval accuracy."""
        if options.mode != "dynamic":
            return {}
        from jft.continual.selector import fit_selector

        seed = run.config.base.train.seed
        features, labels = [], []
        for task in range(index + 1):
            prompts = run.task_prompts(task)
            chosen = per_task([len(prompts)], options.memory_per_task, seed + task)
            features.append(_features(run, [prompts[i] for _, i in chosen]))
            labels += [task] * len(chosen)
        selector = fit_selector(np.concatenate(features), np.asarray(labels), index + 1,
                                steps=options.selector_steps,
                                learning_rate=options.selector_learning_rate, seed=seed)
        selector.save(run.config.stage_dir(index) / SELECTOR_FILE)
        selector.save(run.directory / SELECTOR_FILE)
        run.memo["selector"] = (index, selector)
        held_out = [_features(run, [e.ids for e in run.eval_examples[t]]) for t in
                    range(index + 1)]
        truth = np.concatenate([[t] * len(f) for t, f in enumerate(held_out)])
        return {"selector_accuracy": selector.accuracy(np.concatenate(held_out), truth)}

    def route(self, run, options, index, prompts):
        if options.mode != "dynamic":
            return None
        from jft.continual.selector import Selector

        fitted = run.memo.get("selector")
        if fitted is None or fitted[0] != index:  # a resumed run: the stage's own file
            fitted = (index, Selector.load(run.config.stage_dir(index) / SELECTOR_FILE))
            run.memo["selector"] = fitted
        return fitted[1].predict(_features(run, prompts)).tolist()


def _features(run, prompts):
    """The frozen base's prompt features, computed once per set of prompts in a run: the
    same train and eval prompts are featurised again after every stage."""
    from jft.continual.selector import prompt_features

    cache = run.memo.setdefault("features", {})
    key = tuple(tuple(p) for p in prompts)
    if key not in cache:
        cache[key] = prompt_features(run.model_config, run.original, prompts)
    return cache[key]


CONPET = register(Conpet())
