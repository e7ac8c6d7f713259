"""Losses the layers add to an objective's own: an MoE model's router losses, and those
adapters' feed-forward hooks report (MixLoRA's balance loss).

`forward(..., return_aux=True)` sums what each layer reports over the layers: the MoE
router's statistics under "router" (`jft.models.moe.RouterStats`), and adapters' losses,
already weighted, under their own names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jft.models import ModelConfig
from jft.models.moe import load_balancing_loss, z_loss


def auxiliary_loss(model: ModelConfig, aux: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(the weighted sum to add to the loss, each term unweighted as a metric)."""
    total, metrics = jnp.zeros((), jnp.float32), {}
    for name, value in aux.items():
        if name == "router":
            balance, z = load_balancing_loss(value), z_loss(value)
            total = total + model.moe.aux_loss_coef * balance + model.moe.z_loss_coef * z
            metrics |= {"router/aux_loss": balance, "router/z_loss": z}
        else:
            total = total + value
            metrics[name] = value
    return total, metrics
