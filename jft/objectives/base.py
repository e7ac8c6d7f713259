"""The protocol every training objective implements, and the registry of them."""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import jax

from jft.errors import JftError
from jft.models import ModelConfig


class Objective(Protocol):
    """What a training step minimises, and what the held-out evaluation reports."""

    name: ClassVar[str]

    def loss(self, model: ModelConfig, params: dict, adapters, batch: dict[str, jax.Array],
             rng: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(the scalar to minimise, aux metrics): scalars, logged with the step; `tokens`
        counts what the loss averages over. Gradients flow into the adapters' trainable
        leaves only; `rng` is the step's dropout key (None: no dropout)."""

    def held_out(self, model: ModelConfig, params: dict, adapters, batch: dict[str, jax.Array]
                 ) -> tuple[jax.Array, jax.Array]:
        """(summed loss, count) of an eval batch: the run's eval_loss is their ratio over
        the eval set."""


OBJECTIVES: dict[str, Any] = {}


def register(objective):
    OBJECTIVES[objective.name] = objective
    return objective


def get_objective(name: str):
    if name not in OBJECTIVES:
        raise JftError(f"unknown objective {name!r}; valid: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]
