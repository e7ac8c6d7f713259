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
    # Routed experts as grouped matmuls over tokens sorted by expert, or every token
    # through every expert and the unchosen weighted 0 (the reference the tests compare to).
    moe_impl: Literal["grouped", "dense"] = "grouped"


POLICY_FIELDS = tuple(field.name for field in dataclasses.fields(RuntimePolicy))


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """A mixture-of-experts feed-forward: each token goes to `top_k` of `num_experts`
    expert MLPs of width `expert_mlp_dim`, chosen by a linear router's softmax, with no
    capacity limit (no token is dropped). Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE differ
    in whether the chosen weights are renormalised to sum to 1 (`norm_topk`) and in
    Qwen2-MoE's shared expert, a dense MLP every token goes through (the model's own
    `mlp_dim`-wide gate/up/down), scaled by a sigmoid gate when `shared_gate`.

    Training adds `aux_loss_coef` times the load-balancing loss (Switch Transformer's, as
    transformers computes it) and `z_loss_coef` times the router z-loss (ST-MoE's mean
    squared logsumexp of the router logits)."""

    num_experts: int
    top_k: int
    expert_mlp_dim: int
    norm_topk: bool = True
    shared_expert: bool = False
    shared_gate: bool = False
    aux_loss_coef: float = 0.001
    z_loss_coef: float = 0.0
    # The checkpoint's dense `intermediate_size`, written back to config.json (unused by
    # layers that are all sparse; a shared expert's width is the model's mlp_dim).
    dense_mlp_dim: int | None = None

    def __post_init__(self):
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.top_k} must be between 1 and "
                             f"num_experts={self.num_experts}")


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
    # OLMoE: the q and k norms span all heads together ([N, H], [K, H]), not each head.
    qk_norm_whole: bool = False
    clip_qkv: float | None = None  # OLMoE: q, k and v clamped to [-clip, clip]
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
    moe: MoeConfig | None = None
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
    moe_impl = property(lambda self: self.policy.moe_impl)

    # Sizes of the MoE logical axes (`sites.AXIS_SIZES`); 0 on a dense model.
    num_experts = property(lambda self: self.moe.num_experts if self.moe else 0)
    expert_mlp_dim = property(lambda self: self.moe.expert_mlp_dim if self.moe else 0)
    unit_dim = 1  # a linear with one output (Qwen2-MoE's shared-expert gate)
    gate_up_dim = 2  # an expert stack's fused gate and up projections, gate first

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
        has_mlp = self.moe is None or self.moe.shared_expert
        per_layer = d * h * k * 2 + d * kv * k * 2 + 3 * d * f * has_mlp + 2 * d
        per_layer += (h + 2 * kv) * k * self.qkv_bias + d * self.o_bias
        per_layer += (2 * f + d) * self.mlp_bias + 2 * k * self.qk_norm + 2 * d * self.post_norms
        per_layer += (h + kv) * k * self.qk_norm_whole
        if self.moe is not None:
            e = self.moe
            per_layer += e.num_experts * (d + 3 * d * e.expert_mlp_dim) + d * e.shared_gate
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * per_layer + d + head
