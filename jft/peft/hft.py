"""HFT (Half Fine-Tuning; Hui et al. 2024, arXiv 2404.18466): each round, half of the
linears train and the other half stay frozen, chosen at category level.

Per round (every `interval_steps` optimiser steps, drawn from the refresh key):
attention trains exactly 2 of its 4 matrices (q, k, v, o) in every layer; the FFN trains
2 of its 3 (gate, up, down) in half the layers and 1 in the other half (odd L: one more
layer with 2). So half the matrices of each category train. Only these seven linears
ever train: the paper does not say what happens to embeddings, norms and biases, and
here they stay frozen (its anchors leave that unverified).

Static shapes across rounds: the layers are laid out in a random order and given module
subsets by cycling a pattern in which every module appears equally often (attention
pairs qk, vo, qv, ko, qo, kv; FFN subsets {g,u}, {d}, {g,d}, {u}, {u,d}, {g}), with the
modules randomly relabelled each round. So a module trains in at most `capacity(L)`
layers whatever the draw, and each gets that many slots, the unused ones padding
(layer -1, never hit). Every layer's pair is uniform over the 6 pairs, and which half
of the layers trains 2 FFN matrices is uniform too.

The delta (layout in `active_layers.py`): `parked` {linear: [L, ...]}, `active`
{linear: [cap, ...]} float32 (the only trainable leaves, so the optimiser state covers
half the linears), `active_layers` {linear: int32 [cap]}.
"""

from __future__ import annotations

import dataclasses
from functools import cache

import jax.numpy as jnp
import numpy as np

from jft.errors import JftError
from jft.models import ModelConfig
from jft.models.sites import TRANSFORMER_SITES, LinearSite, linear_sites
from jft.peft.active_layers import ActiveLayersMethod, gather, switch
from jft.peft.base import numpy_rng, register

# Labels index a category's linears (in declaration order) after the round's relabelling.
# Over one cycle of 6 layers each label appears 3 times, and every prefix is nearly
# balanced.
ATTENTION_PATTERN = ((0, 1), (2, 3), (0, 2), (1, 3), (0, 3), (1, 2))
FFN_PATTERN = ((0, 1), (2,), (0, 2), (1,), (1, 2), (0,))


def categories(sites: tuple[LinearSite, ...] = TRANSFORMER_SITES
               ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """HFT's two categories of linears: attention's (under HF's `self_attn`) and the
    FFN's (under `mlp`), whose sizes the patterns above are made for."""
    attention = tuple(s.name for s in sites if s.hf_path.startswith("self_attn."))
    ffn = tuple(s.name for s in sites if s.hf_path.startswith("mlp."))
    if len(attention) != 4 or len(ffn) != 3:
        raise JftError(f"hft's rounds are made for 4 attention and 3 FFN linears; this model "
                       f"has {list(attention)} and {list(ffn)}")
    return attention, ffn


def model_categories(model: ModelConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return categories(linear_sites(model))


@dataclasses.dataclass(frozen=True)
class HftConfig:
    interval_steps: int = 100

    def __post_init__(self):
        value = self.interval_steps
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
            raise JftError(f"hft interval_steps must be a positive integer, got {value!r}")


@cache
def capacity(num_layers: int, groups=None) -> dict[str, int]:
    """Slots per module: the most layers any label gets in the first L pattern entries.
    `groups`: the (attention, FFN) linears, the transformer's by default."""
    attention, ffn = groups or categories()
    out = {}
    for modules, pattern in ((attention, ATTENTION_PATTERN), (ffn, FFN_PATTERN)):
        counts = np.zeros(len(modules), int)
        for i in range(num_layers):
            counts[list(pattern[i % len(pattern)])] += 1
        out |= {m: int(counts.max()) for m in modules}
    return out


def select_round(key, num_layers: int, groups=None) -> dict[str, jnp.ndarray]:
    """{linear: int32 [cap]}: the sorted layers where it trains this round, -1 padded.
    `groups`: the (attention, FFN) linears, the transformer's by default."""
    groups = groups or categories()
    attention, ffn = groups
    rng = numpy_rng(key)
    order = rng.permutation(num_layers)
    chosen: dict[str, list[int]] = {}
    for modules, pattern in ((attention, ATTENTION_PATTERN), (ffn, FFN_PATTERN)):
        relabel = [modules[j] for j in rng.permutation(len(modules))]
        for position, layer in enumerate(order):
            for label in pattern[position % len(pattern)]:
                chosen.setdefault(relabel[label], []).append(int(layer))
    cap = capacity(num_layers, groups)
    out = {}
    for module in (*attention, *ffn):
        layers = sorted(chosen.get(module, []))
        out[module] = jnp.asarray(layers + [-1] * (cap[module] - len(layers)), jnp.int32)
    return out


class Hft(ActiveLayersMethod):
    name = "hft"
    Config = HftConfig

    def init(self, key, base, model, config, calibration_batches=None):
        layers = select_round(key, model.num_layers, model_categories(model))
        parked = {m: base["layers"][m] for m in layers}
        return {
            "parked": parked,
            "active": {m: gather(w, layers[m]) for m, w in parked.items()},
            "active_layers": layers,
        }

    def refresh(self, delta, step, total_steps, key, model, config):
        return switch(delta, select_round(key, model.num_layers, model_categories(model)))


HFT = register(Hft())
