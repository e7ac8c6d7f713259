"""Prefix tuning: P learned keys and values per layer that every query attends to.

Shapes: L layers, P virtual tokens, K kv heads, H head dim; E = K * H is PEFT's
`token_dim` after its grouped-query adjustment (`_prepare_prompt_learning_config` sets
`token_dim = head_dim * num_key_value_heads`), and F the encoder's hidden size
(`encoder_hidden_size`, default E).

Plain delta (`projection=False`, and what `bake` returns):
    {"layers": {"keys": [L, P, K, H], "values": [L, P, K, H]}}
PEFT keeps these as one embedding [P, L * 2 * E]; its `get_prompt` views it as
[P, L * 2, K, H], so the flat index of (layer l, key/value s, head k, dim h) is
((l * 2 + s) * K + k) * H + h, s = 0 for keys. The prefixes are post-rope keys (the
model's rope never touches them) and the real tokens' positions start at P.

With `projection=True` (PEFT's `prefix_projection`), training goes through PEFT's
reparameterisation, an embedding [P, E] -> Linear(E, F) -> tanh -> Linear(F, L*2*E):
    {"embedding": [P, E], "w1": [E, F], "b1": [F],
     "layers": {"w2": [L, F, 2, K, H], "b2": [L, 2, K, H]}}
The second linear's columns are split by layer; `layer_delta` runs the whole encoder
once per forward pass, before the layer scan, which then hands each layer its keys and
values. `bake` does the same outside the forward pass and returns the plain delta, for
inference and export.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jft.errors import JftError
from jft.peft.base import MethodBase, register

INITS = ("random", "zero")


@dataclasses.dataclass(frozen=True)
class PrefixTuningConfig:
    num_virtual_tokens: int = 20
    projection: bool = False
    encoder_hidden_size: int | None = None  # F; None: PEFT's default, token_dim (K * H)
    # "random": PEFT's (normal(0, 1) embeddings, torch.nn.Linear's Kaiming-uniform linears);
    # "zero": PEFT's init_weights="zero", zero prefixes (zero output linear with projection).
    init: str = "random"

    def __post_init__(self):
        if self.num_virtual_tokens < 1:
            raise JftError("prefix tuning num_virtual_tokens must be a positive integer, "
                           f"got {self.num_virtual_tokens}")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise JftError("prefix tuning encoder_hidden_size must be a positive integer, "
                           f"got {self.encoder_hidden_size}")
        if self.encoder_hidden_size is not None and not self.projection:
            raise JftError("prefix tuning encoder_hidden_size is only used with projection=True")
        if self.init not in INITS:
            raise JftError(f"unknown prefix tuning init {self.init!r}; valid: {', '.join(INITS)}")


def token_dim(model) -> int:
    """PEFT's token_dim for prefix tuning: kv heads times head dim."""
    return model.num_kv_heads * model.head_dim


def hidden_size(model, config: PrefixTuningConfig) -> int:
    return config.encoder_hidden_size or token_dim(model)


def _linear_init(key, fan_in: int, shape) -> jax.Array:
    """torch.nn.Linear's default init (weight and bias): uniform(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, minval=-bound, maxval=bound)


def _encode_hidden(delta) -> jax.Array:
    """tanh(embedding W1 + b1): [P, F], in float32."""
    embedding = delta["embedding"].astype(jnp.float32)
    return jnp.tanh(embedding @ delta["w1"].astype(jnp.float32) + delta["b1"].astype(jnp.float32))


def _project(hidden, w2, b2) -> jax.Array:
    """hidden [P, F] through one layer's slice of the output linear: [P, 2, K, H]."""
    return (jnp.einsum("PF,FSKH->PSKH", hidden, w2.astype(jnp.float32))
            + b2.astype(jnp.float32))


class PrefixTuning(MethodBase):
    name = "prefix_tuning"
    Config = PrefixTuningConfig

    def init(self, key, base, model, config, calibration_batches=None):
        L, P, K, H = model.num_layers, config.num_virtual_tokens, model.num_kv_heads, model.head_dim
        zero = config.init == "zero"
        if not config.projection:
            if zero:
                keys = values = jnp.zeros((L, P, K, H), jnp.float32)
            else:  # one normal(0, 1) embedding [P, L*2*E], as PEFT's, laid out per layer
                flat = jax.random.normal(key, (P, L, 2, K, H), jnp.float32)
                keys, values = (jnp.moveaxis(flat[:, :, s], 0, 1) for s in (0, 1))
            return {"layers": {"keys": keys, "values": values}}
        E, F = token_dim(model), hidden_size(model, config)
        k_emb, k_w1, k_b1, k_w2, k_b2 = jax.random.split(key, 5)
        if zero:
            w2, b2 = jnp.zeros((L, F, 2, K, H)), jnp.zeros((L, 2, K, H))
        else:
            w2 = jnp.moveaxis(_linear_init(k_w2, F, (F, L, 2, K, H)), 1, 0)
            b2 = _linear_init(k_b2, F, (L, 2, K, H))
        return {
            "embedding": jax.random.normal(k_emb, (P, E), jnp.float32),
            "w1": _linear_init(k_w1, E, (E, F)),
            "b1": _linear_init(k_b1, E, (F,)),
            "layers": {"w2": w2, "b2": b2},
        }

    def prefix_length(self, config):
        return config.num_virtual_tokens

    def delta_axes(self, delta, model, config):
        # Prefixes shard like the keys and values they join. The encoder's E = K * H is
        # PEFT's token_dim (not the model's embed dim), named as the dims it flattens; its
        # hidden F is the encoder's own and stays replicated, as do the P virtual tokens.
        kv = ("kv_heads", "head_dim")
        if "keys" in delta["layers"]:
            return {"layers": {"keys": ("layers", None, *kv), "values": ("layers", None, *kv)}}
        return {"embedding": (None, kv), "w1": (kv, None), "b1": (None,),
                "layers": {"w2": ("layers", None, None, *kv), "b2": ("layers", None, *kv)}}

    def layer_delta(self, delta, model, config):
        """Each layer's keys and values; a reparameterised delta's encoder runs here once."""
        return bake(delta, config)["layers"]

    def attention_prefix(self, delta_layer, layer, config):
        return delta_layer["keys"], delta_layer["values"]

    def merge(self, base, delta, model, config):
        raise JftError("prefix tuning cannot be merged into the weights: its keys and values "
                       "are extra attention entries, so keep the adapter (bake() it for inference)")


def bake(delta, config: PrefixTuningConfig | None = None):
    """The plain per-layer prefix delta {"layers": {"keys", "values"}} ([L, P, K, H], float32):
    a reparameterised delta's encoder run once; a plain delta comes back as is."""
    layers = delta["layers"]
    if "keys" in layers:
        return delta
    hidden = _encode_hidden(delta)
    kv = jax.vmap(_project, in_axes=(None, 0, 0))(hidden, layers["w2"], layers["b2"])
    return {"layers": {"keys": kv[:, :, 0], "values": kv[:, :, 1]}}


def baked_config(config: PrefixTuningConfig) -> PrefixTuningConfig:
    """The config that goes with `bake`'s delta."""
    return dataclasses.replace(config, projection=False, encoder_hidden_size=None)


def to_peft(delta) -> dict[str, np.ndarray]:
    """The tensors PEFT's adapter_model.safetensors holds: `prompt_embeddings`
    [P, L * 2 * K * H], the (baked) prefix in PEFT's flat layout."""
    layers = bake(delta)["layers"]
    kv = jnp.stack([layers["keys"], layers["values"]], axis=2)  # [L, P, 2, K, H]
    flat = jnp.moveaxis(kv, 1, 0)  # [P, L, 2, K, H]
    return {"prompt_embeddings": np.asarray(flat.reshape(flat.shape[0], -1), np.float32)}


def from_peft(tensors, model, config: PrefixTuningConfig):
    """A plain delta from PEFT's saved `prompt_embeddings` [P, L * 2 * K * H] (PEFT saves
    the projected prefix, so this is the baked delta; use it with `baked_config`)."""
    L, P, K, H = model.num_layers, config.num_virtual_tokens, model.num_kv_heads, model.head_dim
    flat = np.asarray(tensors["prompt_embeddings"], np.float32)
    if flat.shape != (P, L * 2 * K * H):
        raise JftError(f"prompt_embeddings has shape {flat.shape}; expected {(P, L * 2 * K * H)} "
                       "(num_virtual_tokens, num_layers * 2 * kv_heads * head_dim)")
    kv = jnp.moveaxis(jnp.asarray(flat.reshape(P, L, 2, K, H)), 0, 1)  # [L, P, 2, K, H]
    return {"layers": {"keys": kv[:, :, 0], "values": kv[:, :, 1]}}


PREFIX_TUNING = register(PrefixTuning())
