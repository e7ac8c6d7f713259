"""`olora`: orthogonal-subspace LoRA (Wang et al. 2023, arXiv 2310.14152).

Each task trains a new LoRA; the earlier tasks' LoRAs stay in the stack, frozen, so the
model is W + s·Σ_i B_i A_i. The new A is pushed orthogonal to all earlier A's:

    L = L_task + λ1 Σ_layers,modules Σ_ij |(A_prev A_tᵀ)_ij| + λ2 Σ (‖A_t‖_F + ‖B_t‖_F)

with A_prev the earlier tasks' A stacked row-wise (PEFT's [r, in] layout; jft stores
Aᵀ). Defaults as the paper's code: λ1 = 0.5, λ2 = 0 (r 8, alpha 32, q and v in its
scripts; here the config's `method`). Inference needs no task id: every LoRA applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax.numpy as jnp
import optax

from jft.continual.strategies.base import Strategy, register
from jft.objectives.sft import SFT
from jft.training.config import _field


def orthogonality(new: dict, previous: list[dict]) -> jnp.ndarray:
    """Σ |A_prev A_newᵀ| over the modules both adapt: deltas' `a` [L, *in, r]."""
    total = jnp.zeros((), jnp.float32)
    for module, entry in new["layers"].items():
        olds = [d["layers"][module]["a"] for d in previous if module in d["layers"]]
        if not olds:
            continue
        a = _flat(entry["a"])
        a_prev = jnp.concatenate([_flat(o) for o in olds], axis=-1)  # [L, in, r_sum]
        total = total + jnp.abs(jnp.einsum("lip,liq->lpq", a_prev, a)).sum()
    return total


def l2_norms(delta: dict) -> jnp.ndarray:
    """Σ of the Frobenius norms of every layer's A and B."""
    total = jnp.zeros((), jnp.float32)
    for entry in delta["layers"].values():
        for name in ("a", "b"):
            x = entry[name].astype(jnp.float32)
            # safe_norm: B starts at zero, where the norm's gradient is undefined.
            total = total + optax.safe_norm(x.reshape(x.shape[0], -1), 0.0, axis=-1).sum()
    return total


def _flat(a):  # [L, *in, r] -> [L, in, r]
    return a.reshape(a.shape[0], -1, a.shape[-1]).astype(jnp.float32)


@dataclass(frozen=True)
class OLoraObjective:
    orthogonal_weight: float
    l2_weight: float
    name: ClassVar[str] = "olora"

    def loss(self, model, params, adapters, batch, rng):
        loss, aux = SFT.loss(model, params, adapters, batch, rng)
        new = [a for a in adapters if not a.frozen][-1]
        previous = [a.delta for a in adapters if a.frozen]
        orth = orthogonality(new.delta, previous)
        total = loss + self.orthogonal_weight * orth
        if self.l2_weight:
            total = total + self.l2_weight * l2_norms(new.delta)
        return total, {**aux, "ce": loss, "orthogonality": orth}

    def held_out(self, model, params, adapters, batch):
        return SFT.held_out(model, params, adapters, batch)


class OLora(Strategy):
    name = "olora"
    method = "lora"

    @dataclass(frozen=True)
    class Options:
        orthogonal_weight: float = _field(0.5, min=0.0)  # λ1
        l2_weight: float = _field(0.0, min=0.0)  # λ2

    def check(self, config, context):
        super().check(config, context)
        method = config.base.method
        if method.config.dora or method.config.init not in ("default", "gaussian"):
            context.fail("method", "continual.strategy olora stacks plain LoRAs over the "
                         "unchanged base: no dora, init default or gaussian")

    def carry(self, options):
        return "stack"

    def objective(self, run, options, index):
        return OLoraObjective(options.orthogonal_weight, options.l2_weight)


OLORA = register(OLora())
