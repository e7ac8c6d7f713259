"""The device side of serving: fixed slots of one KV cache, each row with its own adapter.

Every request holds one row ("slot") of a KV cache of `max_batch` rows. Its tokens sit at
slots 0..n-1 of its row and the cache's write index is per row (`models.init_cache`),
so requests of any lengths share one decode step and a finished row is reused at once.
The cache's length is a bucket (`length_buckets`) grown and shrunk with the longest
running request, so a decode step reads no more of the cache than it must.

Adapters on the device, one forward for the whole batch whatever the mix:

- LoRA and rsLoRA (any ranks, alphas, targets, rank patterns): one bank of
  `slots` entries with a fixed rank bound and every linear site, so loading an adapter
  writes arrays in place and nothing recompiles (`LoraBankSlots`). Each row gathers its
  adapter's factors (`jft.peft.lora_bank`: S-LoRA / Punica's heterogeneous batching;
  the BGMV kernel at decode where `kernels` selects it).
- Every other servable method (DoRA, IA3, S²FT in its indexed form, SpIEL, ...): one
  stacked bank per (method, config, delta shapes) signature, each linear vmapped over
  rows with each row's own delta (`Rowwise`).

Rowwise adapters wrap the base linear and the LoRA bank wraps them, so a row's output is
what its own adapter alone computes. Programs compile per shape: the decode step once per
cache-length bucket, the prefill once per (rows, prompt length) bucket, at start-up.
A rowwise signature first seen while serving compiles once, when a batch first holds it.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jft.models import ModelConfig, forward, init_cache
from jft.models.sites import linear_site, linear_sites
from jft.models.transformer import Linear, output_logits
from jft.peft.base import Adapter, MethodBase, get_method
from jft.peft.lora import plan as lora_plan
from jft.peft.lora_bank import LoraBankConfig, _BankAdapter

# ---------------------------------------------------------------- buckets


def powers_of_two(low: int, high: int) -> tuple[int, ...]:
    """low, 2 low, 4 low, ... below high, then high itself."""
    sizes, size = [], low
    while size < high:
        sizes.append(size)
        size *= 2
    return (*sizes, high)


def bucket(value: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `value` (the caller checks the largest does)."""
    return next(b for b in buckets if b >= value)


# ---------------------------------------------------------------- the LoRA bank


@dataclasses.dataclass(frozen=True)
class LoraShapes:
    """The LoRA bank's fixed shapes: entries, the rank bound, and per linear site its
    flattened input and output sizes."""

    slots: int
    max_rank: int
    sites: tuple[tuple[str, int, int], ...]

    @classmethod
    def of(cls, model: ModelConfig, slots: int, max_rank: int) -> LoraShapes:
        return cls(slots, max_rank, tuple((s.name, *s.sizes(model)) for s in linear_sites(model)))

    def empty(self, num_layers: int, dtype) -> dict:
        return {name: {"a": jnp.zeros((num_layers, self.slots, k, self.max_rank), dtype),
                       "b": jnp.zeros((num_layers, self.slots, self.max_rank, n), dtype),
                       "scales": jnp.zeros((num_layers, self.slots), jnp.float32)}
                for name, k, n in self.sites}


def lora_host_entry(model: ModelConfig, adapter: Adapter) -> dict:
    """One LoRA adapter as numpy arrays, per site it targets: a [L, K, r] (rank-masked),
    b [L, r, N] and scales [L] (0: untargeted layers). Kept at its own rank in host
    memory; `padded_lora_entry` shapes it for a bank entry.

    An adapter over a base its init rewrote (PiSSA, CorDA, LoRA-GA: W' = W - s A0 B0)
    becomes the LoRA over W itself that it equals, W + s [A A0] [B; -B0], as PEFT
    converts it: rank 2r."""
    layers = model.num_layers
    entry = {}
    for name, module_plan in lora_plan(model, adapter.config).items():
        size_in, size_out = linear_site(model, name).sizes(model)
        factors = adapter.delta["layers"][name]
        rank = module_plan.max_rank
        mask = module_plan.rank_mask()[:, None, :]
        a = [np.asarray(factors["a"], np.float32).reshape(layers, size_in, rank) * mask]
        b = [np.asarray(factors["b"], np.float32).reshape(layers, rank, size_out)]
        if "init_a" in factors:
            a.append(np.asarray(factors["init_a"], np.float32).reshape(layers, size_in, rank)
                     * mask)
            b.append(-np.asarray(factors["init_b"], np.float32).reshape(layers, rank, size_out))
        entry[name] = {"a": np.concatenate(a, axis=2), "b": np.concatenate(b, axis=1),
                       "scales": np.asarray(module_plan.scales, np.float32)}
    return entry


def lora_entry_rank(entry: dict) -> int:
    return max(site["a"].shape[2] for site in entry.values())


def padded_lora_entry(entry: dict, shapes: LoraShapes, num_layers: int) -> dict:
    """A host entry zero-padded to the bank's rank bound, zeros for sites it does not
    target (scale 0: they add nothing)."""
    padded = {}
    for name, size_in, size_out in shapes.sites:
        a = np.zeros((num_layers, size_in, shapes.max_rank), np.float32)
        b = np.zeros((num_layers, shapes.max_rank, size_out), np.float32)
        scales = np.zeros(num_layers, np.float32)
        if name in entry:
            rank = entry[name]["a"].shape[2]
            a[:, :, :rank], b[:, :rank] = entry[name]["a"], entry[name]["b"]
            scales[:] = entry[name]["scales"]
        padded[name] = {"a": a, "b": b, "scales": scales}
    return padded


@partial(jax.jit, donate_argnums=0)
def write_lora_slot(bank: dict, slot, entry: dict) -> dict:
    """The bank with entry `slot` replaced: in place, one compile for every adapter."""
    return {name: {"a": arrays["a"].at[:, slot].set(entry[name]["a"].astype(arrays["a"].dtype)),
                   "b": arrays["b"].at[:, slot].set(entry[name]["b"].astype(arrays["b"].dtype)),
                   "scales": arrays["scales"].at[:, slot].set(entry[name]["scales"])}
            for name, arrays in bank.items()}


# ---------------------------------------------------------------- rowwise methods


def signature(adapter: Adapter) -> tuple:
    """What adapters must share to stack in one rowwise bank."""
    shapes = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), adapter.delta)
    return adapter.method, adapter.config, str(jax.tree.structure(adapter.delta)), str(
        jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)))


@dataclasses.dataclass(frozen=True)
class RowwiseConfig:
    """(method, config) of each rowwise bank in the batch, in order."""

    templates: tuple[tuple[str, Any], ...]


class Rowwise(MethodBase):
    """Rows of one batch through different adapters of any methods that only wrap linears.

    delta: {"groups": [a stacked delta per template, leaves [G, ...]], "rows":
    [templates, B] each row's entry in each bank, -1 where the row uses another}. Each
    row's output is its own adapter's over the plain base linear: every bank's method is
    applied to every row (vmapped, each row with its entry) and each row keeps its own
    bank's result, so no method has to be an exact identity over another's output. As in
    `lora_bank`, the banks are not scanned: each linear gathers its rows' entries of its
    layer. Not registered: it exists only inside the server's forward.
    """

    name = "rowwise"
    Config = RowwiseConfig

    def layer_delta(self, delta, model, config):
        # What the scan slices: the rows, and per bank the linears its method wraps (as
        # dict keys; wraps_linear gets no model to work them out with).
        wraps = []
        for (method, method_config), stacked in zip(config.templates, delta["groups"],
                                                    strict=True):
            impl = get_method(method)
            first = jax.tree.map(lambda leaf: leaf[0], stacked)
            first_layer = jax.tree.map(lambda leaf: leaf[0],
                                       impl.layer_delta(first, model, method_config))
            wraps.append({site.name: jnp.zeros(model.num_layers, bool)
                          for site in linear_sites(model)
                          if impl.wraps_linear(site, first, first_layer, method_config)})
        rows = jnp.broadcast_to(delta["rows"], (model.num_layers, *delta["rows"].shape))
        return {"rows": rows, "wraps": wraps}

    def wraps_linear(self, site, delta, delta_layer, config):
        return any(site.name in wraps for wraps in delta_layer["wraps"])

    def linear(self, site, x, inner, delta, delta_layer, layer, config):
        # Rowwise is first in the adapter list: what it wraps is the plain base linear.
        y = inner(x)
        for g, wraps in enumerate(delta_layer["wraps"]):
            if site.name not in wraps:
                continue
            method, method_config = config.templates[g]
            impl = get_method(method)
            rows = delta_layer["rows"][g]
            every_layer = jax.vmap(partial(impl.layer_delta, model=layer.config,
                                           config=method_config))(delta["groups"][g])
            per_row = jax.tree.map(lambda leaf, rows=rows: leaf[jnp.maximum(rows, 0),
                                                                layer.index], every_layer)

            def one_row(x_row, row_delta, method=method, method_config=method_config):
                pairs = ((Adapter(None, method, method_config), row_delta),)
                return Linear(site, inner.weight, inner.bias, layer, pairs)(x_row[None])[0]

            mine = (rows >= 0).reshape(-1, *(1,) * (y.ndim - 1))
            y = jnp.where(mine, jax.vmap(one_row)(x, per_row).astype(y.dtype), y)
        return y


ROWWISE = Rowwise()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _RowwiseAdapter(Adapter):
    @property
    def impl(self) -> MethodBase:
        return ROWWISE


@partial(jax.jit, donate_argnums=0)
def write_rowwise_slot(stacked, slot, delta):
    return jax.tree.map(lambda bank, leaf: bank.at[slot].set(leaf.astype(bank.dtype)),
                        stacked, delta)


def empty_rowwise_bank(delta, slots: int):
    """`slots` entries shaped like `delta`, zeros until written."""
    return jax.tree.map(lambda leaf: jnp.zeros((slots, *leaf.shape), leaf.dtype), delta)


# ---------------------------------------------------------------- the batch's adapters


@dataclasses.dataclass(frozen=True)
class Routing:
    """Which adapters a batch's rows use: the LoRA bank (or None) with each row's entry
    (-1: none), and the rowwise banks with each row's entry in each ([banks, B], -1)."""

    lora_bank: dict | None
    lora_rows: jax.Array
    rowwise_templates: tuple[tuple[str, Any], ...]
    rowwise_banks: tuple
    rowwise_rows: jax.Array


jax.tree_util.register_dataclass(
    Routing, data_fields=["lora_bank", "lora_rows", "rowwise_banks", "rowwise_rows"],
    meta_fields=["rowwise_templates"])


def batch_adapters(routing: Routing, lora_kernel: str | None) -> list[Adapter]:
    adapters = []
    if routing.rowwise_templates:
        adapters.append(_RowwiseAdapter(
            {"groups": list(routing.rowwise_banks), "rows": routing.rowwise_rows}, "rowwise",
            RowwiseConfig(routing.rowwise_templates)))
    if routing.lora_bank is not None:
        adapters.append(_BankAdapter(
            {"layers": routing.lora_bank, "routing": {"row_adapters": routing.lora_rows}},
            "lora_bank", LoraBankConfig(lora_kernel)))
    return adapters


# ---------------------------------------------------------------- sampling


@dataclasses.dataclass(frozen=True)
class RowSampling:
    """Per row: temperature (0: greedy), top_p (1: off), top_k (0: off), and the seed
    and count of tokens drawn so far, so a row's draws depend only on its own request."""

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    seed: jax.Array
    step: jax.Array


jax.tree_util.register_dataclass(
    RowSampling, data_fields=["temperature", "top_p", "top_k", "seed", "step"], meta_fields=[])


def sample_rows(logits: jax.Array, sampling: RowSampling) -> jax.Array:
    """Next tokens [B] from last-position logits [B, V], each row with its own settings."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw():
        keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(
            sampling.seed, sampling.step)
        scaled = logits / jnp.maximum(sampling.temperature, 1e-6)[:, None]
        filtered = jax.lax.cond(
            jnp.any((sampling.top_p < 1.0) | (sampling.top_k > 0)),
            lambda: _filter(scaled, sampling.top_p, sampling.top_k), lambda: scaled)
        drawn = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
        return jnp.where(sampling.temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(sampling.temperature > 0), draw, lambda: greedy)


def _filter(logits, top_p, top_k):
    """Logits outside each row's top-k and top-p nucleus set to minus infinity."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    rank = jnp.arange(logits.shape[-1])
    # Keep the smallest prefix whose mass reaches top_p (the top token always).
    drop = (jnp.cumsum(probs, axis=-1) - probs >= top_p[:, None])
    drop |= (top_k[:, None] > 0) & (rank >= top_k[:, None])
    unsorted = jnp.zeros_like(drop).at[jnp.arange(logits.shape[0])[:, None], order].set(drop)
    return jnp.where(unsorted, -jnp.inf, logits)


# ---------------------------------------------------------------- the programs


def empty_cache(model: ModelConfig, rows: int, length: int) -> dict:
    cache = init_cache(model, rows, length)
    cache["index"] = jnp.zeros(rows, jnp.int32)
    return cache


@partial(jax.jit, static_argnums=(0,))
def prefill(model: ModelConfig, params, tokens, lengths, routing: Routing,
            sampling: RowSampling):
    """New requests' prompts [n, P] (right-padded, `lengths` real tokens each) ->
    (their first tokens [n], their keys and values [L, n, P, K, H] twice)."""
    rows, length = tokens.shape
    valid = (jnp.arange(length)[None, :] < lengths[:, None]).astype(jnp.int32)
    cache = init_cache(model, rows, length)
    (hidden, head), cache = forward(
        model, params, tokens, segment_ids=valid, cache=cache,
        adapters=batch_adapters(routing, None), with_prompts=False, return_hidden=True)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [n, 1, D]
    logits = output_logits(model, last, head)[:, 0]
    return sample_rows(logits, sampling), cache["k"], cache["v"]


@partial(jax.jit, donate_argnums=0)
def insert(cache, keys, values, slots, lengths):
    """The cache with prefilled rows written to `slots` (beyond the last row: dropped,
    for the padding rows of a prefill bucket)."""
    length = keys.shape[2]
    rows = cache["k"].shape[1]
    slots = jnp.where(slots < 0, rows, slots)
    return {
        "k": cache["k"].at[:, slots, :length].set(keys.astype(cache["k"].dtype), mode="drop"),
        "v": cache["v"].at[:, slots, :length].set(values.astype(cache["v"].dtype), mode="drop"),
        "valid": cache["valid"].at[slots].set(
            jnp.arange(cache["valid"].shape[1])[None] < lengths[:, None], mode="drop"),
        "index": cache["index"].at[slots].set(lengths, mode="drop"),
    }


@partial(jax.jit, static_argnums=(0, 1), donate_argnums=3)
def decode(model: ModelConfig, lora_kernel: str | None, params, cache, tokens,
           routing: Routing, sampling: RowSampling):
    """One token for every row: (next tokens [B], the cache). Rows that hold no request
    compute too (their tokens are ignored and their slot is reset when reused)."""
    positions = cache["index"][:, None]
    logits, cache = forward(model, params, tokens[:, None], positions, cache=cache,
                            adapters=batch_adapters(routing, lora_kernel), with_prompts=False)
    return sample_rows(logits[:, -1], sampling), cache


@partial(jax.jit, static_argnums=1)  # a new shape: no buffer to reuse
def resize(cache, length: int):
    """The cache with `length` slots per row: zero slots added, or the last ones cut
    (the caller keeps every running row within `length`)."""
    current = cache["k"].shape[2]
    if length <= current:
        cut = partial(jax.lax.slice_in_dim, start_index=0, limit_index=length, axis=2)
        return {"k": cut(cache["k"]), "v": cut(cache["v"]),
                "valid": cache["valid"][:, :length], "index": cache["index"]}
    pad = [(0, 0)] * 5
    pad[2] = (0, length - current)
    return {"k": jnp.pad(cache["k"], pad), "v": jnp.pad(cache["v"], pad),
            "valid": jnp.pad(cache["valid"], ((0, 0), (0, length - current))),
            "index": cache["index"]}

