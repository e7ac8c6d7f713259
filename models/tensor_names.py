"""Where each jft parameter lives in HF safetensors and in GGUF, and how to lay it out.

Both formats store linear weights as [out, in] (GGUF lists dims innermost first, so
gguf's numpy arrays already read [out, in]); jft keeps [in, ...out] with heads split.
The top-level tensors (embed, lm_head, final_norm) keep the checkpoint's layout, so
they stream into place a chunk of rows at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from jft.models.config import ModelConfig


@dataclass(frozen=True)
class TensorSource:
    """One jft leaf: its names in each format ({i} is the layer) and the layout change."""

    hf: str
    gguf: str
    to_jft: Callable[[np.ndarray, ModelConfig], np.ndarray]
    from_jft: Callable[[np.ndarray, ModelConfig], np.ndarray]


def _same(w, c):
    return w


def _transpose(w, c):
    return w.T


def _heads_out(heads: str):
    """[heads * H, D] -> [D, heads, H], and back."""

    def to_jft(w, c):
        return w.T.reshape(c.embed_dim, getattr(c, heads), c.head_dim)

    def from_jft(w, c):
        return w.reshape(c.embed_dim, -1).T

    return to_jft, from_jft


def _heads_bias(heads: str):
    def to_jft(b, c):
        return b.reshape(getattr(c, heads), c.head_dim)

    def from_jft(b, c):
        return b.reshape(-1)

    return to_jft, from_jft


def _o_to_jft(w, c):
    return w.T.reshape(c.num_heads, c.head_dim, c.embed_dim)


def _o_from_jft(w, c):
    return w.reshape(-1, c.embed_dim).T


_LAYER = "model.layers.{i}."
_BLK = "blk.{i}."

TOP_LEVEL: dict[str, TensorSource] = {
    "embed": TensorSource("model.embed_tokens.weight", "token_embd.weight", _same, _same),
    "final_norm": TensorSource("model.norm.weight", "output_norm.weight", _same, _same),
    "lm_head": TensorSource("lm_head.weight", "output.weight", _same, _same),
}


def layer_sources(config: ModelConfig) -> dict[str, TensorSource]:
    """The per-layer tensors of this config's family."""

    def src(hf, gguf, to_jft=_same, from_jft=_same):
        return TensorSource(_LAYER + hf, _BLK + gguf, to_jft, from_jft)

    q, kv = _heads_out("num_heads"), _heads_out("num_kv_heads")
    qb, kvb = _heads_bias("num_heads"), _heads_bias("num_kv_heads")
    sources = {
        "attn_norm": src("input_layernorm.weight", "attn_norm.weight"),
        "q_proj": src("self_attn.q_proj.weight", "attn_q.weight", *q),
        "k_proj": src("self_attn.k_proj.weight", "attn_k.weight", *kv),
        "v_proj": src("self_attn.v_proj.weight", "attn_v.weight", *kv),
        "o_proj": src("self_attn.o_proj.weight", "attn_output.weight", _o_to_jft, _o_from_jft),
        "q_bias": src("self_attn.q_proj.bias", "attn_q.bias", *qb),
        "k_bias": src("self_attn.k_proj.bias", "attn_k.bias", *kvb),
        "v_bias": src("self_attn.v_proj.bias", "attn_v.bias", *kvb),
        "o_bias": src("self_attn.o_proj.bias", "attn_output.bias"),
        "q_norm": src("self_attn.q_norm.weight", "attn_q_norm.weight"),
        "k_norm": src("self_attn.k_norm.weight", "attn_k_norm.weight"),
        "gate_proj": src("mlp.gate_proj.weight", "ffn_gate.weight", _transpose, _transpose),
        "up_proj": src("mlp.up_proj.weight", "ffn_up.weight", _transpose, _transpose),
        "down_proj": src("mlp.down_proj.weight", "ffn_down.weight", _transpose, _transpose),
        "gate_bias": src("mlp.gate_proj.bias", "ffn_gate.bias"),
        "up_bias": src("mlp.up_proj.bias", "ffn_up.bias"),
        "down_bias": src("mlp.down_proj.bias", "ffn_down.bias"),
    }
    if config.post_norms:
        # Gemma 2/3 reuse HF's `post_attention_layernorm` name for the norm *after*
        # attention; their pre-MLP norm is `pre_feedforward_layernorm`.
        sources["post_attn_norm"] = src("post_attention_layernorm.weight",
                                        "post_attention_norm.weight")
        sources["mlp_norm"] = src("pre_feedforward_layernorm.weight", "ffn_norm.weight")
        sources["post_mlp_norm"] = src("post_feedforward_layernorm.weight", "post_ffw_norm.weight")
    else:
        sources["mlp_norm"] = src("post_attention_layernorm.weight", "ffn_norm.weight")
    return sources
