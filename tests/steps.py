"""The train step that production runs (`ShardedSteps`), on a one-device mesh, for the
tests that train; and an SFT objective that may be traced only once, so that a test can
assert that the step never recompiles."""

from __future__ import annotations

import chex
import jax
import optax

from jft.models import ModelConfig
from jft.objectives import Objective
from jft.objectives.sft import SFT
from jft.sharding import MeshConfig, make_rules
from jft.training.step import ShardedSteps


def one_device_steps(model: ModelConfig, optimizer: optax.GradientTransformation, params,
                     adapters, seed: int = 0, objective: Objective = SFT) -> ShardedSteps:
    """`python -m jft.train`'s steps on a mesh of one device (the first)."""
    rules = make_rules(MeshConfig(), jax.devices()[:1])
    return ShardedSteps(model, optimizer, rules, params, adapters, seed, objective)


class SftTracedOnce:
    """SFT whose loss raises (`chex.assert_max_traces`) when it is traced a second time: a
    train step built on it fails the test the moment it would compile again."""

    name = "sft"

    def __init__(self):
        # chex counts traces per place of wrapping, across tests: start from zero.
        chex.clear_trace_counter()
        self.loss = chex.assert_max_traces(SFT.loss, n=1)
        self.held_out = SFT.held_out
