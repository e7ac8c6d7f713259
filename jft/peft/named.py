"""Several named adapters over one frozen base, and batches whose rows use different ones.

`AdapterSet` keeps adapters by name (add, select, disable, delete); what it hands the
forward pass is `active()`. `forward_per_row` runs one batch in which row i uses adapter
`ids[i]` (-1: the bare base), with no Python loop over rows and one compile for any mix
of ids. A bank of plain LoRA adapters runs as one forward over the whole batch, each
linear adding every row's own low-rank delta (`lora_bank`, S-LoRA / Punica style, with
the multi-LoRA kernels when `kernels` selects them). Any other bank is stacked, gathered
per row, and the forward pass vmapped over rows with the base shared.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jft.errors import JftError
from jft.models import ModelConfig, forward
from jft.peft.base import Adapter
from jft.peft.lora_bank import forward_lora_bank, is_lora_bank


class AdapterSet:
    """Named adapters; each name holds one adapter or a stack of several methods."""

    def __init__(self):
        self._named: dict[str, tuple[Adapter, ...]] = {}
        self._active: str | None = None

    def add(self, name: str, adapters: Adapter | Sequence[Adapter], select: bool = False):
        if name in self._named:
            raise JftError(f"an adapter named {name!r} exists; delete it first")
        self._named[name] = (adapters,) if isinstance(adapters, Adapter) else tuple(adapters)
        if select:
            self.select(name)

    def select(self, name: str):
        self._require(name)
        self._active = name

    def disable(self):
        """Run the bare base model until another adapter is selected."""
        self._active = None

    def delete(self, name: str):
        self._require(name)
        del self._named[name]
        if self._active == name:
            self._active = None

    def get(self, name: str) -> tuple[Adapter, ...]:
        self._require(name)
        return self._named[name]

    @property
    def names(self) -> list[str]:
        return list(self._named)

    def active(self) -> tuple[Adapter, ...]:
        """The adapters to pass to `forward` (empty when disabled)."""
        return self._named[self._active] if self._active is not None else ()

    def _require(self, name: str):
        if name not in self._named:
            valid = ", ".join(self._named) or "none yet"
            raise JftError(f"no adapter named {name!r}; adapters: {valid}")


def forward_per_row(
    config: ModelConfig,
    params,
    tokens: jax.Array,
    adapter_ids: jax.Array,
    bank: Sequence[Sequence[Adapter]],
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Logits [B, T, V] where row i uses `bank[adapter_ids[i]]`, or the base for id -1.

    A bank whose every entry is one plain LoRA adapter (rsLoRA too, not DoRA) may mix
    ranks, alphas and targets. Otherwise every entry must stack the same methods with the
    same configs and shapes (one DoRA per tenant, say); -1 uses each method's identity
    delta.
    """
    entries = [tuple(entry) for entry in bank]
    if not entries:
        raise JftError("forward_per_row needs at least one adapter in the bank")
    if is_lora_bank(entries):
        return forward_lora_bank(config, params, tokens, adapter_ids,
                                 [entry[0] for entry in entries], segment_ids)
    return _forward_per_row_vmapped(config, params, tokens, adapter_ids, entries, segment_ids)


def _forward_per_row_vmapped(config, params, tokens, adapter_ids, entries, segment_ids=None):
    """`forward_per_row` for any bank: the forward pass vmapped over rows."""
    template = entries[0]
    for entry in entries[1:]:
        if [(a.method, a.config) for a in entry] != [(a.method, a.config) for a in template]:
            raise JftError("adapters in one bank must share methods and configs")
    stacked = []
    for position, adapter in enumerate(template):
        deltas = [entry[position].delta for entry in entries]
        deltas.append(adapter.impl.identity(adapter.delta, params, config, adapter.config))
        stacked.append(jax.tree.map(lambda *leaves: jnp.stack(leaves), *deltas))
    rows = jnp.where(adapter_ids < 0, len(entries), adapter_ids)
    per_row = [jax.tree.map(lambda leaf: leaf[rows], bank_delta) for bank_delta in stacked]

    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)

    def one_row(row_tokens, row_segments, row_deltas):
        adapters = [a.with_delta(d) for d, a in zip(row_deltas, template, strict=True)]
        return forward(config, params, row_tokens[None], segment_ids=row_segments[None],
                       adapters=adapters)[0]

    return jax.vmap(one_row)(tokens, segment_ids, per_row)
