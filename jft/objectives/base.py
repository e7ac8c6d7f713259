"""The protocol every training objective implements, and the registry of them."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Protocol

import jax

from jft.errors import JftError
from jft.models import ModelConfig


class Objective(Protocol):
    """What a training step minimises, and what the held-out evaluation reports."""

    name: ClassVar[str]

    def loss(self, model: ModelConfig, params: dict, adapters, batch: dict[str, jax.Array],
             rng: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(the scalar to minimise, aux metrics): scalars, logged with the step under their
        names (`tokens` counts what the loss averages over and is not logged). Gradients
        flow into the adapters' trainable leaves only; `rng` is the step's dropout key
        (None: no dropout)."""

    def held_out(self, model: ModelConfig, params: dict, adapters, batch: dict[str, jax.Array]
                 ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """(summed loss, count, summed metrics) of an eval batch: the run's eval_loss is the
        ratio of the first two over the eval set, and each metric's sum over the same count
        is logged as `eval_<name>`."""


class ObjectiveBase:
    """What an objective declares beside its loss: its options and what it needs."""

    name: ClassVar[str] = ""

    @dataclasses.dataclass(frozen=True)
    class Config:
        """No options."""

    # The `data.format`s this objective trains on (None: the SFT formats).
    formats: ClassVar[tuple[str, ...] | None] = None
    # Whether its eval_loss is a per-token cross-entropy (then eval_perplexity is logged).
    per_token: ClassVar[bool] = True
    # Whether it compares the policy with a reference model (`uses_reference`).
    compares_with_reference: ClassVar[bool] = False
    # Whether it samples its own training batches with the policy (`jft.training.rollouts`)
    # rather than reading them from the data; its reference cannot then be precomputed.
    samples: ClassVar[bool] = False

    @classmethod
    def uses_reference(cls, config) -> bool:
        """Whether a run with this config computes reference log-probabilities."""
        return cls.compares_with_reference

    @classmethod
    def check(cls, config) -> None:
        """Refuses options that do not go together (`ConfigValueError` naming the key);
        each option's type and bounds are checked before, from the Config's fields."""

    def __init__(self, config=None):
        self.config = self.Config() if config is None else config


OBJECTIVES: dict[str, type] = {}


def register(objective: type) -> type:
    OBJECTIVES[objective.name] = objective
    return objective


def get_objective(name: str) -> type:
    if name not in OBJECTIVES:
        raise JftError(f"unknown objective {name!r}; valid: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


def make_objective(name: str, config: Any = None):
    """An objective with its config (None: its defaults)."""
    return get_objective(name)(config)
