"""Rows of one batch using different plain LoRA adapters, in one forward pass (S-LoRA, Punica).

`named.forward_per_row` runs a batch in which row i uses adapter `ids[i]` of a bank. Its
general path vmaps the whole forward over rows, which serves any method but makes every
row its own forward and needs every entry to share one config. When each entry is one
plain LoRA (or rsLoRA) adapter, `forward_lora_bank` runs ONE forward over the whole batch
instead: each targeted linear computes the base x @ W for all rows at once, and a private
method's `linear` adds every row's own low-rank delta s_g (x A_g) B_g, g being the
row's adapter (-1: none, the bare base). Ranks, alphas, rank/alpha patterns, rsLoRA,
targets and layers_to_transform may differ between the adapters.

The bank's delta, stacked once per call outside the layer scan: per module targeted by
any adapter, a [L, G, K, R] and b [L, G, R, N] (the module's input and output dims
flattened to K and N, see `LinearSite.sizes`), and scales [L, G] from each adapter's
`lora.plan`. The scan does not slice the bank (a layer's slice of all G entries would be
copied at every linear); each linear indexes it at its layer and its rows' entries. R is
the largest rank any adapter gives the module; smaller ranks are zero-padded and `a` is
multiplied by each adapter's rank mask, as LoRA's own forward masks it, so padding,
rank_pattern's smaller ranks and untargeted layers add exactly nothing. A module an
adapter does not target is all zeros for it, with scale 0.

How the deltas are computed is settled once per call (`LoraBankConfig.kernel`):

- "grouped" (kernels on, prefill T > 1): `multi_lora.grouped_lora`, Punica's SGMV. The
  rows are sorted by adapter before the forward, so each adapter's tokens are contiguous
  (group sizes in tokens: rows x T), and the logits unsorted after it; -1 rows sort last,
  outside every group, and get no delta.
- "gathered" (kernels on, decode T == 1): `multi_lora.gathered_lora`, Punica's BGMV,
  with each token's adapter id; no sort.
- None (kernels off: `kernels: xla`, or `auto` where no kernel was measured faster, or a
  multi-device mesh): each row gathers its adapter's factors of the layer ([B, K, R],
  [B, R, N], straight from the [L, G, ...] bank) and
  two batched einsums apply them, which is what the vmap path computed for LoRA. Its
  cost, B*T*R*(K+N) multiply-adds plus B*R*(K+N) gathered factor entries per module, does
  not grow with the bank, and it needs no sort. The kernels' XLA references grow with
  it: `gathered_lora_reference` shrinks every row against all G adapters (G*R columns,
  one-hot selected), G times the work, and `grouped_lora_reference`'s ragged_dot lowers
  on CPU to a dense product over a [G, M, K] masked copy of the input, G times again
  (on GPU it becomes XLA's ragged dot, not measured here). A serving bank of many
  adapters cannot afford that. The gather is amortised over the T tokens of a row; at
  decode with few adapters and many rows the one-hot form would read fewer bytes, and
  that regime is what the BGMV kernel is for.

Numerics follow the kernels: products accumulate in float32, and the rank-R intermediate
scale * (x @ a) is rounded to x's dtype before the expand.

The method is not registered (`base.register`): it exists only inside this forward, and
registering would make it a method a run's config could name. `_BankAdapter` is an
`Adapter` whose `impl` is the method itself, which is all the hooks need. Inference only:
no dropout, and DoRA banks keep the vmap path (DoRA rescales by the norm of each
adapter's whole W + s A B). Like the vmap path, every row shares `params`, so adapters
from inits that rebase the weights (PiSSA, CorDA, LoRA-GA) are applied over the given
base, not each over its own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jft.models import ModelConfig, forward
from jft.models.sites import linear_sites
from jft.peft.base import Adapter, MethodBase, use_kernel
from jft.peft.lora import plan


def is_lora_bank(entries: Sequence[Sequence[Adapter]]) -> bool:
    """Whether every bank entry is exactly one plain LoRA or rsLoRA adapter (not DoRA)."""
    return all(len(entry) == 1 and entry[0].method == "lora" and not entry[0].config.dora
               for entry in entries)


def forward_lora_bank(
    config: ModelConfig,
    params,
    tokens: jax.Array,
    adapter_ids: jax.Array,
    loras: Sequence[Adapter],
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Logits [B, T, V] where row i uses `loras[adapter_ids[i]]`, or the base for id -1."""
    adapter_ids = jnp.asarray(adapter_ids, jnp.int32)
    kernel = None
    if use_kernel("multi_lora", config):
        kernel = "grouped" if tokens.shape[1] > 1 else "gathered"
    order = None
    if kernel == "grouped":
        from jft.pallas_kernels.multi_lora import sort_by_adapter

        order, group_sizes = sort_by_adapter(adapter_ids, len(loras))
        tokens = tokens[order]
        segment_ids = None if segment_ids is None else segment_ids[order]
        routing = {"group_sizes": group_sizes}
    else:
        routing = {"row_adapters": adapter_ids}
    bank = _BankAdapter({"layers": _stack(config, loras), "routing": routing}, "lora_bank",
                        LoraBankConfig(kernel))
    logits = forward(config, params, tokens, segment_ids=segment_ids, adapters=[bank])
    return logits if order is None else logits[jnp.argsort(order)]


@dataclasses.dataclass(frozen=True)
class LoraBankConfig:
    """kernel: the Pallas kernel that computes the deltas, or None for XLA (see above)."""

    kernel: Literal["grouped", "gathered"] | None = None


class LoraBank(MethodBase):
    name = "lora_bank"
    Config = LoraBankConfig

    def layer_delta(self, delta, model, config):
        # The scan hands each layer a slice of a leading L axis; the routing is the same
        # for every layer, so it is broadcast (a few ints per row) rather than closed over.
        # The bank itself is not scanned: slicing a layer out of it would copy all G
        # entries per linear per layer, when the rows need at most B of them.
        return {"routing": jax.tree.map(
            lambda x: jnp.broadcast_to(x, (model.num_layers, *x.shape)), delta["routing"])}

    def wraps_linear(self, site, delta, delta_layer, config):
        return site.name in delta["layers"]

    def linear(self, site, x, inner, delta, delta_layer, layer, config):
        y = inner(x)
        bank = delta["layers"][site.name]  # a [L, G, K, R], b [L, G, R, N], scales [L, G]
        dims_in, dims_out = site.dims(layer.config)
        batch, length = x.shape[:2]
        x = x.reshape(batch, length, math.prod(dims_in))
        routing = delta_layer["routing"]
        scales = bank["scales"][layer.index]  # [G]

        def deltas():  # [B, T, N]
            if config.kernel is None:
                return _gathered_factors_delta(x, routing["row_adapters"], layer.index, bank)
            from jft.pallas_kernels.multi_lora import gathered_lora, grouped_lora

            flat = x.reshape(batch * length, -1)
            a, b = bank["a"][layer.index], bank["b"][layer.index]
            if config.kernel == "gathered":
                token_adapters = jnp.repeat(routing["row_adapters"], length)
                out = gathered_lora(flat, token_adapters, a, b, scales)
            else:
                out = grouped_lora(flat, routing["group_sizes"] * length, a, b, scales)
            return out.reshape(batch, length, -1)

        # A bank sized for every linear (a server's) holds adapters that target few of
        # them: where no row's adapter targets this linear in this layer, skip the work.
        if "row_adapters" in routing:
            rows = routing["row_adapters"]
            used = jnp.any((rows >= 0) & (scales[jnp.maximum(rows, 0)] != 0))
        else:
            used = jnp.any((routing["group_sizes"] > 0) & (scales != 0))
        size_out = bank["b"].shape[-1]
        delta = jax.lax.cond(used, deltas, lambda: jnp.zeros((batch, length, size_out), x.dtype))
        return y + delta.reshape(batch, length, *dims_out)


LORA_BANK = LoraBank()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _BankAdapter(Adapter):
    """An Adapter whose method is `LORA_BANK`, which is not in the registry."""

    @property
    def impl(self) -> MethodBase:
        return LORA_BANK


def _gathered_factors_delta(x, row_adapters, index, bank):
    """x [B, T, K], row_adapters [B] (-1: none) -> each row's delta [B, T, N] in x.dtype
    from its own factors of layer `index`, gathered straight from the bank."""
    has_adapter = row_adapters >= 0
    rows = jnp.maximum(row_adapters, 0)
    row_scales = jnp.where(has_adapter, bank["scales"][index, rows], 0.0)
    shrunk = jnp.einsum("BTK,BKR->BTR", x, bank["a"][index, rows].astype(x.dtype),
                        preferred_element_type=jnp.float32)
    shrunk = (shrunk * row_scales[:, None, None]).astype(x.dtype)
    return jnp.einsum("BTR,BRN->BTN", shrunk, bank["b"][index, rows].astype(x.dtype),
                      preferred_element_type=jnp.float32).astype(x.dtype)


def _stack(model: ModelConfig, loras: Sequence[Adapter]) -> dict:
    """Per module targeted by any adapter: a [L, G, K, R], b [L, G, R, N], scales [L, G]."""
    plans = [plan(model, lora.config) for lora in loras]
    num_layers = model.num_layers
    stacked = {}
    for site in linear_sites(model):
        module = site.name
        targeting = [i for i, p in enumerate(plans) if module in p]
        if not targeting:
            continue
        size_in, size_out = site.sizes(model)
        rank = max(plans[i][module].max_rank for i in targeting)
        dtype = jnp.result_type(*(loras[i].delta["layers"][module]["a"] for i in targeting))
        a_all, b_all, scales = [], [], []
        for lora, lora_plan in zip(loras, plans, strict=True):
            if module not in lora_plan:
                a_all.append(jnp.zeros((num_layers, size_in, rank), dtype))
                b_all.append(jnp.zeros((num_layers, rank, size_out), dtype))
                scales.append(np.zeros(num_layers))
                continue
            module_plan = lora_plan[module]
            entry = lora.delta["layers"][module]
            mask = jnp.asarray(module_plan.rank_mask(), entry["a"].dtype)[:, None, :]
            a = entry["a"].reshape(num_layers, size_in, -1) * mask
            b = entry["b"].reshape(num_layers, -1, size_out)
            padding = rank - module_plan.max_rank
            a_all.append(jnp.pad(a, ((0, 0), (0, 0), (0, padding))).astype(dtype))
            b_all.append(jnp.pad(b, ((0, 0), (0, padding), (0, 0))).astype(dtype))
            scales.append(np.asarray(module_plan.scales))
        stacked[module] = {"a": jnp.stack(a_all, axis=1), "b": jnp.stack(b_all, axis=1),
                           "scales": jnp.asarray(np.stack(scales, axis=1), jnp.float32)}
    return stacked
