"""Gemma 2: Gemma 1 plus soft-capping, alternating sliding-window layers and post-norms."""

from __future__ import annotations

from jft.models.checkpoint_fields import GGUFMetadata, HFConfig, hf_activation, hf_layer_types
from jft.models.config import ModelConfig

HF_MODEL_TYPES = ("gemma2",)
GGUF_ARCHITECTURES = ("gemma2",)


def from_hf(hf: HFConfig) -> ModelConfig:
    num_layers = hf.require("num_hidden_layers")
    num_heads = hf.require("num_attention_heads")
    head_dim = hf.get("head_dim", 256)
    # Even layers slide, odd layers see everything.
    default_types = [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)
    ]
    return ModelConfig(
        family="gemma2",
        vocab_size=hf.require("vocab_size"),
        embed_dim=hf.require("hidden_size"),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads", num_heads),
        head_dim=head_dim,
        mlp_dim=hf.require("intermediate_size"),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope=hf.rope(),
        layer_types=hf_layer_types(hf, num_layers, default_types),
        sliding_window=hf.get("sliding_window", 4096),
        activation=hf_activation(hf, "hidden_activation", "gelu_pytorch_tanh"),
        qkv_bias=hf.get("attention_bias", False),
        o_bias=hf.get("attention_bias", False),
        post_norms=True,
        norm_plus_one=True,
        embed_scale=True,
        query_scale=hf.get("query_pre_attn_scalar", head_dim) ** -0.5,
        attn_softcap=hf.get("attn_logit_softcapping"),
        final_softcap=hf.get("final_logit_softcapping"),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        max_position=hf.get("max_position_embeddings", 8192),
        bos_id=hf.token_id("bos"),
        eos_id=hf.token_id("eos"),
    )


def from_gguf(meta: GGUFMetadata, vocab_size: int, tied: bool) -> ModelConfig:
    num_layers = meta.require("block_count")
    num_heads = meta.require("attention.head_count")
    embed_dim = meta.require("embedding_length")
    head_dim = meta.get("attention.key_length", 256)
    return ModelConfig(
        family="gemma2",
        vocab_size=vocab_size,
        embed_dim=embed_dim,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=meta.get("attention.head_count_kv", num_heads),
        head_dim=head_dim,
        mlp_dim=meta.require("feed_forward_length"),
        norm_eps=meta.get("attention.layer_norm_rms_epsilon", 1e-6),
        rope=meta.rope(),
        layer_types=tuple("sliding" if (i + 1) % 2 else "full" for i in range(num_layers)),
        sliding_window=meta.get("attention.sliding_window", 4096),
        activation="gelu_tanh",
        post_norms=True,
        norm_plus_one=True,
        embed_scale=True,
        query_scale=gguf_query_scale(num_layers, embed_dim, num_heads, head_dim, big_layers=46),
        attn_softcap=meta.get("attn_logit_softcapping", 50.0),
        final_softcap=meta.get("final_logit_softcapping", 30.0),
        tie_embeddings=tied,
        max_position=meta.get("context_length", 8192),
        bos_id=meta.token_id("bos"),
        eos_id=meta.token_id("eos"),
    )


def gguf_query_scale(num_layers, embed_dim, num_heads, head_dim, big_layers: int) -> float:
    """GGUF omits query_pre_attn_scalar; like llama.cpp, the 27B size scales by D / N."""
    scalar = embed_dim // num_heads if num_layers == big_layers else head_dim
    return scalar**-0.5
