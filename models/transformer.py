"""The forward pass: a pure function over a params pytree, layers stacked and scanned.

Shape letters: B batch, T query length, S key length (the cache size when decoding),
D embed, N query heads, K kv heads, G = N // K, H head dim, F mlp, V vocab, L layers.

Params (every leaf under `layers` has a leading L axis, see `PARAM_AXES`):
    embed [V, D], final_norm [D], lm_head [V, D] (untied models only; checkpoint layout)
    layers: attn_norm [L, D], q_proj [L, D, N, H], k_proj / v_proj [L, D, K, H],
            o_proj [L, N, H, D], mlp_norm [L, D], gate_proj / up_proj [L, D, F],
            down_proj [L, F, D], and per family: q_bias [L, N, H], k_bias / v_bias
            [L, K, H], o_bias [L, D], gate_bias / up_bias [L, F], down_bias [L, D],
            q_norm / k_norm [L, H], post_attn_norm / post_mlp_norm [L, D].
The linears (q/k/v/o, gate/up/down, their biases) are declared once, in `sites.py`;
`PARAM_AXES` and `param_shapes` derive their entries from those declarations, and each
is called as `hooks.linear(site, x, layer)`, through the adapters that wrap it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from jft.models import attention as attention_blocks
from jft.models.config import ModelConfig
from jft.models.sites import LinearSite, declared_sites, linear_sites
from jft.pallas_kernels import use_kernel
from jft.quant import params as quantized
from jft.quant.tensor import QuantizedTensor, dequantize, is_quantized
from jft.sharding.logical import constrain

Params = dict[str, Any]
Cache = dict[str, jax.Array]

# Logical axes of every leaf; the linears' weights and biases come from their sites.
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("vocab", "embed"),
    "final_norm": ("embed",),
    "attn_norm": ("layers", "embed"),
    "q_norm": ("layers", "head_dim"),
    "k_norm": ("layers", "head_dim"),
    "post_attn_norm": ("layers", "embed"),
    "mlp_norm": ("layers", "embed"),
    "post_mlp_norm": ("layers", "embed"),
    **{site.name: site.weight_axes for site in declared_sites()},
    **{site.bias: site.bias_axes for site in declared_sites() if site.bias},
}
WHOLE_QK_NORM_AXES = {"q_norm": ("layers", "heads", "head_dim"),
                      "k_norm": ("layers", "kv_heads", "head_dim")}


def param_shapes(config: ModelConfig) -> dict[str, Any]:
    """The params tree's shapes for this config (leaf = tuple of ints)."""
    c = config
    d, h, L = c.embed_dim, c.head_dim, c.num_layers
    sites = linear_sites(config)
    layers = {"attn_norm": (L, d)}
    for site in sites:  # each norm before the first linear of its sublayer
        if site.hf_path.startswith("mlp.") and "mlp_norm" not in layers:
            layers["mlp_norm"] = (L, d)
        layers[site.name] = (L, *site.weight_shape(c))
    layers.setdefault("mlp_norm", (L, d))  # before the MoE router when there is no MLP
    layers |= {s.bias: (L, *s.dims(c)[1]) for s in sites if s.has_bias(c)}
    if c.qk_norm_whole:
        layers |= {"q_norm": (L, c.num_heads, h), "k_norm": (L, c.num_kv_heads, h)}
    elif c.qk_norm:
        layers |= {"q_norm": (L, h), "k_norm": (L, h)}
    if c.post_norms:
        layers |= {"post_attn_norm": (L, d), "post_mlp_norm": (L, d)}
    shapes: dict[str, Any] = {"embed": (c.vocab_size, d), "final_norm": (d,), "layers": layers}
    if not c.tie_embeddings:
        shapes["lm_head"] = (c.vocab_size, d)
    return shapes


def logical_axes(config: ModelConfig | None = None) -> dict[str, tuple[str, ...]]:
    """Leaf name -> logical axes: `PARAM_AXES`, with the linears this config's family
    declares (`sites.linear_sites`) where it is given."""
    if config is None:
        return PARAM_AXES
    sites = linear_sites(config)
    return (PARAM_AXES | {site.name: site.weight_axes for site in sites}
            | {site.bias: site.bias_axes for site in sites if site.bias is not None}
            | (WHOLE_QK_NORM_AXES if config.qk_norm_whole else {}))


def param_axes(params: Params, config: ModelConfig | None = None) -> Params:
    """The logical axis names of every leaf, as a tree shaped like `params` (`config`:
    for a family that declares linears of its own)."""
    axes = logical_axes(config)
    sites = {site.name: site for site in (linear_sites(config) if config else declared_sites())}

    def leaf_axes(key, value):
        if isinstance(value, dict):
            return param_axes(value, config)
        if is_quantized(value):  # a site's weight as its [*out, in] matrix, or a table
            matrix = quantized.matrix_axes(sites[key]) if key in sites else axes[key]
            return quantized.quantized_axes(value, matrix)
        return axes[key]

    return {key: leaf_axes(key, value) for key, value in params.items()}


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32, std=0.02) -> Params:
    """Random params, as HF initialises them (normal weights, unit norms): for tests and
    benchmarks, whose speed does not depend on the weights."""
    shapes = param_shapes(config)
    flat, treedef = jax.tree.flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    leaves = []
    for (path, shape), leaf_key in zip(flat, jax.random.split(key, len(flat)), strict=True):
        if path[-1].key.endswith("norm"):
            value = jnp.full(shape, 0.0 if config.norm_plus_one else 1.0)
        else:
            value = std * jax.random.normal(leaf_key, shape)
        leaves.append(value.astype(dtype))
    return jax.tree.unflatten(treedef, leaves)


def init_cache(config: ModelConfig, batch: int, length: int, dtype=None) -> Cache:
    """An empty KV cache of `length` slots per row."""
    dtype = dtype or config.dtype
    shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "valid": jnp.zeros((batch, length), bool),  # slot holds a real (non-pad) token
        # Next slot to write, shared by all rows. A server batching requests of different
        # lengths gives each row its own ([B]): every row's tokens then start at slot 0.
        "index": jnp.zeros((), jnp.int32),
    }


def forward(
    config: ModelConfig,
    params: Params,
    tokens: jax.Array | Sequence[Sequence[int]],
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    cache: Cache | None = None,
    adapters: Sequence[Any] = (),
    with_prompts: bool | None = None,
    rng: jax.Array | None = None,
    return_hidden: bool = False,
    return_aux: bool = False,
) -> Any:
    """Logits [B, T, V] in float32, plus the updated cache when one is given.

    tokens [B, T]: token ids, as an array or nested Python lists.
    segment_ids [B, T]: packed examples (attention never crosses segments) and padding
    (segment 0). Positions default to restarting at 0 in each segment, or to continuing
    from the cache's write index.

    adapters: PEFT adapters (`jft.peft.Adapter`) applied on top of the frozen `params`.
    Virtual tokens of prompt tuning are prepended when `with_prompts` (default: when
    there is no cache, i.e. not while decoding), and their logits are dropped. Explicit
    positions number the caller's own tokens; virtual tokens and prefix-tuning keys come
    first, so the forward pass shifts them past those.
    rng: a key for adapter dropout; None (the default) means no dropout.
    return_hidden: return (final hidden states [B, T, D], output head [V, D]) instead of
    logits, for a loss that computes logits a chunk at a time or a server that needs
    only each row's last position.
    return_aux: also return what the layers report for training losses, summed over
    layers: {"router": `moe.RouterStats`} on an MoE model, and what adapters' feed-forward
    hooks add (MixLoRA's balance loss); {} for a dense model. The result is then
    (out, aux), or (out, cache, aux).
    """
    tokens = jnp.asarray(tokens, jnp.int32)  # [B, T]; nested Python lists too
    for adapter in adapters:
        params = adapter.impl.edit_params(params, adapter.delta, config, adapter.config)
    x = embed(config, params, tokens)
    prompts = [
        p for a in adapters if (p := a.impl.prompt_embeddings(a.delta, a.config)) is not None
    ]
    prefix_len = _prefix_length(adapters)
    # Explicit positions number the caller's tokens: shift them past virtual tokens and
    # prefixes, wherever those are (prepended now, or already in the cache).
    if positions is not None:
        positions = positions + sum(p.shape[0] for p in prompts) + prefix_len
    if with_prompts is None:
        with_prompts = cache is None
    num_prepended = 0
    if with_prompts and prompts:
        x, tokens, positions, segment_ids = _prepend_prompts(
            x, prompts, tokens, positions, segment_ids, prefix_len
        )
        num_prepended = sum(p.shape[0] for p in prompts)
    batch, length = tokens.shape
    valid = jnp.ones((batch, length), bool) if segment_ids is None else segment_ids != 0
    start = 0 if cache is None else cache["index"]
    if positions is None:
        positions = _default_positions(batch, length, segment_ids, start) + prefix_len

    x = constrain(x, ("batch", "seq", "embed"))

    query_slots = _query_slots(start, length)  # [T], or [B, T] for per-row cache indices
    if cache is None:
        key_slots, key_valid = query_slots, valid
        same_segment = (
            None if segment_ids is None else segment_ids[:, :, None] == segment_ids[:, None, :]
        )
    else:
        cache_len = cache["k"].shape[2]
        key_slots = jnp.arange(cache_len)
        key_valid = write_slots(cache["valid"], valid, start)
        same_segment = None
    inputs = layer_inputs(config, positions, query_slots, key_slots, key_valid, same_segment,
                          prefix_len, valid)

    def layer_step(x, scanned):
        layer, is_sliding, layer_cache, index, deltas = scanned
        layer_rng = None if rng is None else jax.random.fold_in(rng, index)
        hooks = LayerHooks(config, index, tuple(zip(adapters, deltas, strict=True)), layer_rng,
                           inputs.prefix_visible(is_sliding))
        x, layer_cache, aux = decoder_layer(config, layer, x, is_sliding, inputs, hooks,
                                            layer_cache, start, with_aux=True)
        return x, (layer_cache, aux)

    step = _remat(layer_step, config.remat)
    is_sliding = jnp.asarray([t == "sliding" for t in config.layer_types])
    layer_caches = None if cache is None else (cache["k"], cache["v"])
    layer_deltas = tuple(a.impl.layer_delta(a.delta, config, a.config) for a in adapters)
    scanned = (params["layers"], is_sliding, layer_caches, jnp.arange(config.num_layers),
               layer_deltas)
    x, (new_kv, aux) = jax.lax.scan(step, x, scanned)

    x, head = final_hidden(config, params, x)
    x = x[:, num_prepended:]
    out = (x, head) if return_hidden else output_logits(config, x, head)
    results = (out,)
    if cache is not None:
        results += ({"k": new_kv[0], "v": new_kv[1], "valid": key_valid,
                     "index": start + length},)
    if return_aux:
        results += (jax.tree.map(lambda a: jnp.sum(a, axis=0), aux),)
    return results[0] if len(results) == 1 else results


# ---------------------------------------------------------------- the forward's steps
# `forward` is embed -> layer_inputs -> decoder_layer per layer (scanned) -> final_hidden
# -> output_logits. Each step is usable on its own: calibration statistics run the
# layers one at a time, objectives compute logits a chunk at a time.


def embed(config: ModelConfig, params: Params, tokens: jax.Array) -> jax.Array:
    """Token ids [B, T] -> the residual stream entering layer 0 [B, T, D]."""
    dtype = jnp.dtype(config.dtype)
    # Gathered whole first, as FSDP gathers every weight before use: a lookup into a
    # vocab-sharded table would make XLA replicate the batch instead.
    if is_quantized(params["embed"]):
        x = quantized.rows(params["embed"], tokens, dtype)  # never the whole table
    else:
        table = constrain(params["embed"], (None, None))
        x = jnp.take(table, tokens, axis=0).astype(dtype)  # [B, T, D]
    if config.embed_scale:
        # HF multiplies by sqrt(D) rounded to the activation dtype, inside its embedding
        # module: prompt-tuning's virtual tokens (prepended after this) are not scaled.
        x = x * jnp.asarray(config.embed_dim**0.5, dtype)
    return x


@dataclasses.dataclass(frozen=True)
class LayerInputs:
    """What each layer reads besides the residual stream, for full and sliding layers:
    attention masks [B, 1, T, S] and rotary tables ([B, T, H/2] cos, sin; the sliding
    ones None where the model has none), and which prefix-tuning keys each query sees."""

    masks: tuple[jax.Array, jax.Array | None]
    rope: tuple[Any, Any]
    prefix_in_window: jax.Array  # [T, P], or [B, 1, T, P] for per-row query slots
    query_valid: jax.Array | None = None  # [B, T]: real tokens (not padding), or None: all

    def for_layer(self, is_sliding) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(mask, cos, sin) of a layer; `is_sliding` may be traced (the layer scan)."""
        full, sliding = self.masks
        mask = full if sliding is None else jnp.where(is_sliding, sliding, full)
        cos, sin = (self.rope[0] if self.rope[1] is None else jax.tree.map(
            lambda g, l: jnp.where(is_sliding, l, g), self.rope[0], self.rope[1]))
        return mask, cos, sin

    def prefix_visible(self, is_sliding) -> jax.Array:
        return jnp.where(is_sliding, self.prefix_in_window, True)


def layer_inputs(config: ModelConfig, positions, query_slots, key_slots, key_valid,
                 same_segment=None, prefix_len: int = 0, query_valid=None) -> LayerInputs:
    """Masks and rotary tables for queries at `query_slots` [T] (positions [B, T]) over
    keys at `key_slots` [S] (`key_valid` [B, S]; `same_segment` [B, T, S] for packing)."""
    masks = _attention_masks(config, query_slots, key_slots, key_valid, same_segment)
    # Prefix-tuning keys sit at slots -P..-1: sliding layers see them only within the window.
    prefix_slots = jnp.arange(prefix_len) - prefix_len
    prefix_in_window = (
        query_slots[..., None] - prefix_slots < config.sliding_window
        if config.sliding_window else jnp.ones((*query_slots.shape, prefix_len), bool)
    )
    if prefix_in_window.ndim == 3:  # per-row slots: [B, 1, T, P], like the masks
        prefix_in_window = prefix_in_window[:, None]
    return LayerInputs(masks, _rope_tables(config, positions), prefix_in_window, query_valid)


def packed_layer_inputs(config: ModelConfig, segment_ids: jax.Array) -> LayerInputs:
    """`layer_inputs` of packed rows [B, T] with no cache: positions restart in each
    segment, attention stays within it, padding (segment 0) is never attended to."""
    batch, length = segment_ids.shape
    slots = jnp.arange(length)
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    positions = _default_positions(batch, length, segment_ids, 0)
    return layer_inputs(config, positions, slots, slots, segment_ids != 0, same_segment,
                        query_valid=segment_ids != 0)


# A family whose layers are not the transformer block registers its own: same arguments,
# same (x, (k, v) cache, aux) result. The feed-forward is the seam MoE models use
# (`feed_forward`), so an MoE family needs no block of its own.
BLOCKS: dict[str, Any] = {}


def decoder_layer(config: ModelConfig, layer, x, is_sliding, inputs: LayerInputs, hooks,
                  layer_cache=None, start=0, with_aux=False):
    """One decoder layer of the model's family: (new residual stream, its (k, v) cache),
    and with `with_aux` what it reports for training losses (`forward`'s return_aux)."""
    mask, cos, sin = inputs.for_layer(is_sliding)
    block = BLOCKS.get(config.family, transformer_block)
    valid = inputs.query_valid if inputs.query_valid is not None else jnp.ones(x.shape[:2], bool)
    x, cache, aux = block(config, layer, x, mask, cos, sin, layer_cache, start, hooks, valid)
    return (x, cache, aux) if with_aux else (x, cache)


def final_hidden(config: ModelConfig, params: Params, x: jax.Array):
    """The last layer's output normed, and the output head [V, D] (the embedding table
    when tied): `output_logits` of the two are the logits."""
    head = params["embed"] if config.tie_embeddings else params["lm_head"]
    if is_quantized(head):
        head = dequantize(head, x.dtype)
    return rms_norm(x, params["final_norm"], config), head


def output_logits(config: ModelConfig, x: jax.Array, head: jax.Array) -> jax.Array:
    """Final hidden states [B, T, D] -> logits [B, T, V] in float32."""
    logits = jnp.einsum("BTD,VD->BTV", x, head.astype(x.dtype),
                        preferred_element_type=jnp.float32)
    if config.final_softcap:
        logits = config.final_softcap * jnp.tanh(logits / config.final_softcap)
    return constrain(logits, ("batch", "seq", "vocab"))


class LayerHooks:
    """One layer's view of the adapters: each linear goes through the adapters that wrap
    it (a plain matmul without), params through their `edit_layer`."""

    def __init__(self, config: ModelConfig, index, adapters_and_deltas, rng=None,
                 prefix_visible=None):
        self.config, self.index, self.pairs, self.rng = config, index, adapters_and_deltas, rng
        self.prefix_visible = prefix_visible  # [T, P]: which prefix keys each query sees

    def linear(self, site: LinearSite, x: jax.Array, layer, groups=None) -> jax.Array:
        """The linear at `site` on x [B, T, *in] -> [B, T, *out]: the base einsum plus its
        bias, wrapped by every adapter that targets the site, in list order (adapters[0]
        wraps the base linear, adapters[1] wraps that, ...), so stacking equals merging
        them one after another in list order. An expert stack run grouped takes the rows
        routed to experts [M, *in] and their group sizes [E] (`LinearSite.experts`)."""
        bias = layer.get(site.bias) if site.bias is not None else None
        pairs = tuple((adapter, delta) for adapter, delta in self.pairs
                      if adapter.impl.wraps_linear(site, adapter.delta, delta, adapter.config))
        weight = layer[site.name]
        if is_quantized(weight):
            return QuantizedLinear(site, weight, bias, self, pairs)(x)
        return Linear(site, weight, bias, self, pairs, groups)(x)

    def feed_forward(self, h: jax.Array, layer, valid: jax.Array, base) -> tuple[jax.Array, dict]:
        """The layer's feed-forward on h [B, T, D]: `base(h)` -> (y, aux), wrapped by every
        adapter whose `wraps_feed_forward` is true (MixLoRA's experts), in list order.
        `valid` [B, T] marks real tokens, for routers' statistics."""
        for adapter, delta in self.pairs:
            if adapter.impl.wraps_feed_forward(adapter.delta, delta, adapter.config):
                base = partial(adapter.impl.feed_forward, inner=base, delta=adapter.delta,
                               delta_layer=delta, layer=self, params=layer, valid=valid,
                               config=adapter.config)
        return base(h)

    def without_dropout(self) -> LayerHooks:
        return LayerHooks(self.config, self.index, self.pairs, None, self.prefix_visible)

    def edit_layer(self, layer):
        for adapter, delta in self.pairs:
            layer = adapter.impl.edit_layer(layer, adapter.delta, delta, self, adapter.config)
        return layer

    def attention_prefix(self):
        """Concatenated per-layer key/value prefixes [P, K, H] of all adapters, or None."""
        prefixes = [
            p for adapter, delta in self.pairs
            if (p := adapter.impl.attention_prefix(delta, self, adapter.config)) is not None
        ]
        if not prefixes:
            return None
        return tuple(jnp.concatenate(parts, axis=0) for parts in zip(*prefixes, strict=True))


class Linear:
    """What an adapter's `linear` hook wraps: callable on x [B, T, *in] for y [B, T, *out].

    `site` is the call site, `weight` and `bias` (None if absent) the base's, as stored in
    the layer's params: a hook casts them to x's dtype. `is_plain`: this is the bare base
    linear, einsum(site.equation, x, weight) + bias, which a fused kernel computing x W +
    delta in one pass may replace. Otherwise it is the adapters `pairs` (innermost first)
    wrapped around it, and `merged()` gives the weight and bias they apply.
    """

    def __init__(self, site: LinearSite, weight: jax.Array, bias: jax.Array | None,
                 hooks: LayerHooks, pairs=(), groups=None):
        self.site, self.weight, self.bias = site, weight, bias
        self.hooks, self.pairs, self.groups = hooks, pairs, groups

    @property
    def is_plain(self) -> bool:
        return not self.pairs

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.is_plain:
            y = self.site.project(x, self.weight, self.groups)
            return y if self.bias is None else y + self.bias.astype(x.dtype)
        adapter, delta = self.pairs[-1]
        inner = self.inner()
        return adapter.impl.linear(self.site, x, inner, adapter.delta, delta, self.hooks,
                                   adapter.config)

    def merged(self) -> tuple[jax.Array, jax.Array]:
        """(weight [*in, *out], bias [*out]) in float32 of this linear as one affine map,
        without gradient: the base's for the plain linear; else measured by applying it,
        dropout off, to zero and to every unit input (a matmul as large as the weight
        itself: for DoRA stacked over other adapters)."""
        dims_in, dims_out = self.site.dims(self.hooks.config)
        if self.is_plain:
            weight = self.site.to_in_out(self.weight.astype(jnp.float32))
            bias = (jnp.zeros(dims_out, jnp.float32) if self.bias is None
                    else self.bias.astype(jnp.float32))
            return jax.lax.stop_gradient(weight), jax.lax.stop_gradient(bias)
        quiet = self.with_hooks(self.hooks.without_dropout())
        size = math.prod(dims_in)
        probes = jnp.concatenate([jnp.zeros((1, size)), jnp.eye(size)]).reshape(
            1, size + 1, *dims_in)  # [B=1, T=1+in, *in]: zero, then each unit input
        out = jax.lax.stop_gradient(quiet(probes).astype(jnp.float32))[0]  # [1 + in, *out]
        bias = out[0]
        return (out[1:] - bias).reshape(*dims_in, *dims_out), bias


    def inner(self) -> Linear:
        """This linear without its outermost adapter."""
        return Linear(self.site, self.weight, self.bias, self.hooks, self.pairs[:-1],
                      self.groups)

    def with_hooks(self, hooks: LayerHooks) -> Linear:
        return Linear(self.site, self.weight, self.bias, hooks, self.pairs, self.groups)


class QuantizedLinear(Linear):
    """A linear whose base weight is stored quantized (`jft.quant`). `weight` is the
    dequantized weight in the compute dtype, made where a hook asks for it, inside the
    layer scan. The plain base linear dequantizes under `jax.checkpoint`: the backward
    pass dequantizes again rather than keeping every layer's float weight from the
    forward (as residuals of the scan, they would be the whole float base), so at most
    one layer's weights are dequantized at a time; under `kernels: pallas` it is the
    fused dequantize-and-matmul kernel, which never writes the float weight at all."""

    def __init__(self, site, quantized_weight: QuantizedTensor, bias, hooks, pairs=(),
                 weight=None):
        self.quantized_weight = quantized_weight
        if weight is None:
            in_dims = site.dims(hooks.config)[0]
            weight = quantized.dequantize_weight(site, quantized_weight, in_dims,
                                                 hooks.config.dtype)
        super().__init__(site, weight, bias, hooks, pairs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.is_plain and use_kernel("quant_matmul", self.hooks.config):
            from jft.pallas_kernels.quant_matmul import quant_matmul

            lead = x.shape[:len(self.site.lead)]
            y = quant_matmul(x.reshape(math.prod(lead), -1), self.quantized_weight_matrix)
            y = y.reshape(*lead, *self.site.dims(self.hooks.config)[1])
            return y if self.bias is None else y + self.bias.astype(x.dtype)
        if self.is_plain:
            y = _dequantized_matmul(self.site, self.site.dims(self.hooks.config)[0], x,
                                    self.quantized_weight)
            return y if self.bias is None else y + self.bias.astype(x.dtype)
        return super().__call__(x)

    @property
    def quantized_weight_matrix(self) -> QuantizedTensor:
        """The weight as the quantized matrix [out, in] (the site's output dims merged)."""
        q = self.quantized_weight
        reshape = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
        return dataclasses.replace(q, codes=reshape(q.codes), scales=reshape(q.scales))

    def inner(self) -> Linear:
        return QuantizedLinear(self.site, self.quantized_weight, self.bias, self.hooks,
                               self.pairs[:-1], self.weight)

    def with_hooks(self, hooks: LayerHooks) -> Linear:
        return QuantizedLinear(self.site, self.quantized_weight, self.bias, hooks, self.pairs,
                               self.weight)


@partial(jax.checkpoint, static_argnums=(0, 1))
def _dequantized_matmul(site: LinearSite, in_dims, x, weight: QuantizedTensor):
    """x through the site's einsum with the weight dequantized in x's dtype; saves only
    its inputs for the backward pass."""
    return jnp.einsum(site.equation, x,
                      quantized.dequantize_weight(site, weight, in_dims, x.dtype))


def transformer_block(config, layer, x, mask, cos, sin, layer_cache, start, hooks, valid):
    """One decoder layer: attention, then the feed-forward (the MLP, or routed experts);
    returns the new residual stream, this layer's (k, v) cache and the feed-forward's
    aux (router statistics)."""
    layer = hooks.edit_layer(layer)
    x, new_cache = attention_sublayer(config, layer, x, mask, cos, sin, layer_cache, start,
                                      hooks)
    h = rms_norm(x, layer["mlp_norm"], config)
    mlp, aux = hooks.feed_forward(h, layer, valid, partial(feed_forward, config, layer,
                                                           hooks=hooks, valid=valid))
    if config.post_norms:
        mlp = rms_norm(mlp, layer["post_mlp_norm"], config)
    return constrain(x + mlp, ("batch", "seq", "embed")), new_cache, aux


def feed_forward(config, layer, h, hooks, valid):
    """The model's own feed-forward on the normed h [B, T, D]: (y, aux)."""
    if config.moe is not None:
        from jft.models.moe import moe_feed_forward

        return moe_feed_forward(config, layer, h, hooks, valid)
    sites = {site.name: site for site in linear_sites(config)}
    gate = hooks.linear(sites["gate_proj"], h, layer)  # [B, T, F]
    up = hooks.linear(sites["up_proj"], h, layer)  # [B, T, F]
    hidden = constrain(activation(gate, config) * up, ("batch", "seq", "mlp"))
    return hooks.linear(sites["down_proj"], hidden, layer), {}  # [B, T, D]


def attention_sublayer(config, layer, x, mask, cos, sin, layer_cache, start, hooks):
    """Self-attention and its residual: (x + attention(x), this layer's (k, v) cache)."""
    dtype = x.dtype
    sites = {site.name: site for site in linear_sites(config)}
    h = rms_norm(x, layer["attn_norm"], config)
    q = hooks.linear(sites["q_proj"], h, layer)  # [B, T, N, H]
    k = hooks.linear(sites["k_proj"], h, layer)  # [B, T, K, H]
    v = hooks.linear(sites["v_proj"], h, layer)  # [B, T, K, H]
    if config.qk_norm_whole:  # over all heads at once, before any clipping
        q = rms_norm(q.reshape(*q.shape[:2], -1), layer["q_norm"].reshape(-1),
                     config).reshape(q.shape)
        k = rms_norm(k.reshape(*k.shape[:2], -1), layer["k_norm"].reshape(-1),
                     config).reshape(k.shape)
    elif config.qk_norm:
        q, k = rms_norm(q, layer["q_norm"], config), rms_norm(k, layer["k_norm"], config)
    if config.clip_qkv is not None:
        q, k, v = (jnp.clip(t, -config.clip_qkv, config.clip_qkv) for t in (q, k, v))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q = constrain(q, ("batch", "seq", "heads", "head_dim"))

    new_cache = None
    if layer_cache is not None:
        cache_k, cache_v = layer_cache
        cache_k, cache_v = write_slots(cache_k, k, start), write_slots(cache_v, v, start)
        new_cache = (cache_k, cache_v)
        k, v = cache_k.astype(dtype), cache_v.astype(dtype)

    prefix = hooks.attention_prefix()
    if prefix is not None:  # prefix tuning: learned keys/values every query may attend to
        batch = x.shape[0]
        k = jnp.concatenate([jnp.broadcast_to(prefix[0].astype(dtype), (batch, *prefix[0].shape)),
                             k], axis=1)
        v = jnp.concatenate([jnp.broadcast_to(prefix[1].astype(dtype), (batch, *prefix[1].shape)),
                             v], axis=1)
        visible = jnp.broadcast_to(hooks.prefix_visible, (*mask.shape[:3], prefix[0].shape[0]))
        mask = jnp.concatenate([visible, mask], axis=-1)
    out = attention(q, k, v, mask, config)  # [B, T, N, H]
    attn = hooks.linear(sites["o_proj"], out, layer)  # [B, T, D]
    if config.post_norms:
        attn = rms_norm(attn, layer["post_attn_norm"], config)
    return constrain(x + attn, ("batch", "seq", "embed")), new_cache


def attention(q, k, v, mask, config: ModelConfig) -> jax.Array:
    """q [B, T, N, H], k/v [B, S, K, H], mask [B, 1, T, S] bool -> [B, T, N, H].

    `config.attention_impl`: "xla" forms the whole [B, N, T, S] logits, "cudnn" is
    cuDNN's fused kernel (GPU, bf16/fp16), "blockwise" goes over keys a block at a time
    (`attention.blockwise_attention`); None picks blockwise once the keys outnumber one
    block (long sequences, where XLA's logits and probabilities dominate memory) and XLA
    otherwise (short sequences, decoding).
    """
    if config.attn_softcap is None:
        impl = config.attention_impl
        if impl is None:
            long = k.shape[1] > attention_blocks.BLOCK and q.shape[1] > 1
            impl = "blockwise" if long else "xla"
        if impl == "blockwise":
            return attention_blocks.blockwise_attention(q, k, v, mask, config.scale)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=config.scale,
                                            implementation=impl)
    # jax.nn.dot_product_attention has no logit soft-capping (Gemma 2), so this path
    # spells the softmax out.
    b, t, n, h = q.shape
    groups = n // k.shape[2]
    q = q.reshape(b, t, k.shape[2], groups, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    logits = logits * config.scale
    logits = config.attn_softcap * jnp.tanh(logits / config.attn_softcap)
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(b, t, n, h)


def rms_norm(x: jax.Array, weight: jax.Array, config: ModelConfig) -> jax.Array:
    """RMSNorm over the last axis, in float32; Gemma scales by (1 + w)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + config.norm_eps)
    scale = weight.astype(jnp.float32)
    if config.norm_plus_one:
        scale = 1.0 + scale
    return (normed * scale).astype(x.dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half rotary embedding (HF layout). x [B, T, *, H], cos/sin [B, T, H/2]."""
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


def _rope_tables(config: ModelConfig, positions: jax.Array):
    """(cos, sin) for global layers and, on Gemma 3, for sliding layers (else None)."""

    def table(rope):
        inv_freq = jnp.asarray(rope.inverse_frequencies(config.head_dim), jnp.float32)
        angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
        return jnp.cos(angles), jnp.sin(angles)

    local = table(config.local_rope) if config.local_rope is not None else None
    return table(config.rope), local


def _attention_masks(config, query_slots, key_slots, key_valid, same_segment):
    """Boolean [B, 1, T, S] masks for full and sliding layers (None if no sliding layers).

    Slots are indices in the sequence (or cache); with left padding and packing they
    advance exactly like positions, so causality and windows are measured on them.
    """
    causal = key_slots <= query_slots[..., None]  # [T, S] or [B, T, S]
    full = causal & key_valid[:, None, :]  # [B, T, S]
    if same_segment is not None:
        full = full & same_segment
    sliding = None
    if "sliding" in config.layer_types:
        in_window = query_slots[..., None] - key_slots < config.sliding_window
        sliding = (full & in_window)[:, None]
    return full[:, None], sliding


def _query_slots(start, length: int) -> jax.Array:
    """The cache slots of `length` new tokens written at `start`: [T] for a shared
    index, [B, T] for one per row."""
    start = jnp.asarray(start)
    return (start if start.ndim == 0 else start[:, None]) + jnp.arange(length)


def write_slots(cache: jax.Array, new: jax.Array, start) -> jax.Array:
    """cache [B, S, ...] with new [B, T, ...] written from slot `start`: a scalar shared
    by all rows, or one slot per row [B]."""
    new = new.astype(cache.dtype)
    if jnp.ndim(start) == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache, new, start, axis=1)
    return jax.vmap(partial(jax.lax.dynamic_update_slice_in_dim, axis=0))(cache, new, start)


def _prepend_prompts(x, prompts, tokens, positions, segment_ids, prefix_len):
    """Prepends virtual tokens [P, D] to every row, in each row's first real segment."""
    batch = x.shape[0]
    virtual = jnp.concatenate(prompts, axis=0).astype(x.dtype)
    count = virtual.shape[0]
    x = jnp.concatenate([jnp.broadcast_to(virtual, (batch, *virtual.shape)), x], axis=1)
    tokens = jnp.concatenate([jnp.zeros((batch, count), jnp.int32), tokens.astype(jnp.int32)],
                             axis=1)
    if positions is not None:
        virtual_positions = jnp.broadcast_to(prefix_len + jnp.arange(count), (batch, count))
        positions = jnp.concatenate([virtual_positions, positions], axis=1)
    if segment_ids is not None:
        first_real = jnp.take_along_axis(
            segment_ids, jnp.argmax(segment_ids != 0, axis=1)[:, None], axis=1
        )
        segment_ids = jnp.concatenate(
            [jnp.broadcast_to(first_real, (batch, count)), segment_ids], axis=1
        )
    return x, tokens, positions, segment_ids


def _prefix_length(adapters) -> int:
    """Prefix-tuning keys sit before the sequence, so its positions start after them."""
    return sum(a.impl.prefix_length(a.config) for a in adapters)


def _default_positions(batch, length, segment_ids, start):
    if segment_ids is None:
        return jnp.broadcast_to(_query_slots(start, length), (batch, length))
    # Restart at 0 wherever a new segment begins.
    index = jnp.arange(length)
    is_start = jnp.concatenate(
        [jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    segment_start = jax.lax.cummax(jnp.where(is_start, index, 0), axis=1)
    return index - segment_start


def activation(x, config: ModelConfig):
    if config.activation in ("gelu_tanh", "gelu"):
        return jax.nn.gelu(x, approximate=config.activation == "gelu_tanh")
    return jax.nn.silu(x)


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _remat(step, policy: str):
    if policy == "none":
        return step
    if policy not in _REMAT_POLICIES:
        raise ValueError(f"remat policy {policy!r}; valid: none, {', '.join(_REMAT_POLICIES)}")
    return jax.checkpoint(step, policy=_REMAT_POLICIES[policy], prevent_cse=False)
