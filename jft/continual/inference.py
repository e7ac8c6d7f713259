"""A continual run's model for inference: `jft.load(model, adapter=RUN)` and
`python -m jft.generate --continual RUN`.

What answers depends on how the strategy carried its adapters (`Strategy.carry`): the
last stage's adapter (`carry`), every stage's merged into the base (`merge`), all of
them stacked (`stack`, O-LoRA), or the one a prompt is routed to by the task selector
(`separate`, dynamic ConPET). Each finished stage saved its adapter in jft's format
(`stages/NN-task/adapter/`), which is what is read here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from jft.errors import JftError

RESULTS_FILE = "continual.json"


def is_continual_run(path: str | os.PathLike) -> bool:
    return (Path(path) / RESULTS_FILE).is_file()


@dataclass
class Router:
    """Routes prompts to one of `experts` [(base, [Adapter])] with `selector` over the
    features of the `features_base` model (the run's frozen base)."""

    selector: object
    experts: list
    features_base: dict

    def route(self, model, prompts) -> list[int]:
        from jft.continual.selector import prompt_features

        return self.selector.predict(prompt_features(model, self.features_base, prompts)
                                     ).tolist()


def load_continual(run_dir, base: dict, model, rules=None):
    """(params, adapters, router or None) of a continual run over `base`."""
    from jft.continual.config import continual_from_dict
    from jft.continual.run import ADAPTER_DIR
    from jft.formats.adapters import load_adapter

    run_dir = Path(run_dir)
    try:
        raw = yaml.safe_load((run_dir / "config.yaml").read_text())
        raw.pop("fingerprint", None)
    except (OSError, yaml.YAMLError, AttributeError) as error:
        raise JftError(f"{run_dir}/config.yaml: cannot read the run's config ({error})"
                       ) from None
    config = continual_from_dict(raw, str(run_dir / "config.yaml"), check_paths=False)
    from jft.continual.strategies import STRATEGIES

    strategy = STRATEGIES[config.continual.strategy]
    mode = strategy.carry(config.continual.options)
    stages = [config.stage_dir(i) / ADAPTER_DIR for i in range(len(config.tasks))]
    stages = [path for path in stages if path.is_dir()]
    if not stages:
        raise JftError(f"{run_dir}: no stage has finished yet; nothing to load")
    if mode == "carry":
        params, adapters = load_adapter(stages[-1], base, model, rules)
        return params, adapters, None
    if mode == "merge":
        params = base
        for path in stages:
            params, (adapter,) = load_adapter(path, params, model, rules)
            params = adapter.impl.merge(params, adapter.delta, model, adapter.config)
        return params, [], None
    loaded = [load_adapter(path, base, model, rules) for path in stages]
    if mode == "stack":
        return base, [adapters[0] for _, adapters in loaded], None
    from jft.continual.selector import Selector
    from jft.continual.strategies.conpet import SELECTOR_FILE

    selector = Selector.load(config.stage_dir(len(stages) - 1) / SELECTOR_FILE)
    return base, [], Router(selector, loaded, base)
