"""The architecture description shared by every family, its rope settings, and the
runtime policy a forward pass runs under.

Families differ in a handful of switches (qkv bias, q/k norms, Gemma's `1 + w` norms,
soft-capping, sliding-window layers), so one config type and one forward pass serve
them all. Each family file only knows how to fill this config from its checkpoint. What
the checkpoint does not decide (compute dtype, remat, attention implementation, kernels)
is a `RuntimePolicy` of its own, chosen by the caller.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np

LayerType = Literal["full", "sliding"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings: HF's rope types `default`, `linear` and `llama3`."""

    theta: float = 10000.0
    kind: Literal["default", "linear", "llama3"] = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    # llama.cpp stores Llama 3.1 scaling as per-frequency divisors (`rope_freqs`).
    freq_factors: tuple[float, ...] | None = None

    def inverse_frequencies(self, head_dim: int) -> np.ndarray:
        """Per-pair rotation frequencies, float64 so that the casts match HF's fp32 table."""
        inv_freq = 1.0 / (self.theta ** (np.arange(0, head_dim, 2, dtype=np.int64) / head_dim))
        inv_freq = inv_freq.astype(np.float32).astype(np.float64)
        if self.freq_factors is not None:
            inv_freq = inv_freq / np.asarray(self.freq_factors, np.float64)
        if self.kind == "linear":
            return inv_freq / self.factor
        if self.kind == "llama3":
            return _llama3_frequencies(inv_freq, self)
        return inv_freq


def _llama3_frequencies(inv_freq: np.ndarray, rope: RopeConfig) -> np.ndarray:
    # Llama 3.1's schedule: long wavelengths slowed by `factor`, short ones kept,
    # and a smooth blend between the two bands.
    low_freq_wavelen = rope.original_max_position / rope.low_freq_factor
    high_freq_wavelen = rope.original_max_position / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, blended, scaled)


@dataclasses.dataclass(frozen=True)
class RuntimePolicy:
    """How a forward pass runs, not what the checkpoint is: the dtype activations are
    computed in (params keep their own dtype), the remat policy of the layer scan, the
    attention implementation (`transformer.attention`), and whether adapters' fused Pallas
    kernels replace their XLA paths (`jft.pallas_kernels`). `jft.load` and the run config
    choose it; no checkpoint does."""

    dtype: str = "bfloat16"
    remat: RematPolicy = "none"
    attention_impl: Literal["xla", "cudnn", "blockwise"] | None = None
    kernels: Literal["auto", "pallas", "xla"] = "auto"


POLICY_FIELDS = tuple(field.name for field in dataclasses.fields(RuntimePolicy))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer's architecture, and the `policy` it runs under.
    Hashable, so it can be a static jit argument."""

    family: str
    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    norm_eps: float
    rope: RopeConfig
    layer_types: tuple[LayerType, ...]
    # Sliding layers rotate with their own base on Gemma 3; None means `rope`.
    local_rope: RopeConfig | None = None
    sliding_window: int | None = None
    activation: Literal["silu", "gelu", "gelu_tanh"] = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False  # Gemma 2/3: norms after attention and after the MLP too
    norm_plus_one: bool = False  # Gemma: RMSNorm scales by (1 + w)
    embed_scale: bool = False  # Gemma: embeddings times sqrt(embed_dim)
    query_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    tie_embeddings: bool = False
    max_position: int = 8192
    bos_id: int | None = None
    eos_id: int | None = None
    policy: RuntimePolicy = RuntimePolicy()

    def __post_init__(self):
        if len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if "sliding" in self.layer_types and not self.sliding_window:
            raise ValueError("sliding layers need a sliding_window size")

    @property
    def scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.head_dim**-0.5

    # The forward reads the policy's fields as the config's own.
    dtype = property(lambda self: self.policy.dtype)
    remat = property(lambda self: self.policy.remat)
    attention_impl = property(lambda self: self.policy.attention_impl)
    kernels = property(lambda self: self.policy.kernels)

    def replace(self, **changes) -> ModelConfig:
        """A copy with `changes`, architecture fields or the policy's (`dtype=...`)."""
        policy = {name: changes.pop(name) for name in POLICY_FIELDS if name in changes}
        if policy:
            changes["policy"] = dataclasses.replace(self.policy, **policy)
        return dataclasses.replace(self, **changes)

    @property
    def architecture(self) -> ModelConfig:
        """This config under the default policy: what the checkpoint alone decides."""
        return dataclasses.replace(self, policy=RuntimePolicy())

    def num_params(self) -> int:
        """Parameters as stored (tied embeddings counted once)."""
        d, h, kv, k, f = (
            self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim, self.mlp_dim
        )
        per_layer = d * h * k * 2 + d * kv * k * 2 + 3 * d * f + 2 * d
        per_layer += (h + 2 * kv) * k * self.qkv_bias + d * self.o_bias
        per_layer += (2 * f + d) * self.mlp_bias + 2 * k * self.qk_norm + 2 * d * self.post_norms
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * per_layer + d + head
