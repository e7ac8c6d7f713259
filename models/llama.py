"""Llama 2, Llama 3 / 3.1 / 3.2 (llama3 rope scaling), Mistral and SmolLM2."""

from __future__ import annotations

from jft.models.checkpoint_fields import GGUFMetadata, HFConfig, hf_layer_types
from jft.models.config import ModelConfig

HF_MODEL_TYPES = ("llama", "mistral")
GGUF_ARCHITECTURES = ("llama",)


def from_hf(hf: HFConfig) -> ModelConfig:
    embed_dim = hf.require("hidden_size")
    num_heads = hf.require("num_attention_heads")
    num_layers = hf.require("num_hidden_layers")
    window = hf.get("sliding_window")
    default_types = ["sliding_attention" if window else "full_attention"] * num_layers
    return ModelConfig(
        family="llama",
        vocab_size=hf.require("vocab_size"),
        embed_dim=embed_dim,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads", num_heads),
        head_dim=hf.get("head_dim", embed_dim // num_heads),
        mlp_dim=hf.require("intermediate_size"),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope=hf.rope(),
        layer_types=hf_layer_types(hf, num_layers, default_types),
        sliding_window=window,
        activation="silu",
        qkv_bias=hf.get("attention_bias", False),
        o_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        max_position=hf.get("max_position_embeddings", 8192),
        bos_id=hf.token_id("bos"),
        eos_id=hf.token_id("eos"),
    )


def from_gguf(meta: GGUFMetadata, vocab_size: int, tied: bool) -> ModelConfig:
    embed_dim = meta.require("embedding_length")
    num_heads = meta.require("attention.head_count")
    num_layers = meta.require("block_count")
    window = meta.get("attention.sliding_window")
    return ModelConfig(
        family="llama",
        vocab_size=vocab_size,
        embed_dim=embed_dim,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=meta.get("attention.head_count_kv", num_heads),
        head_dim=meta.get("attention.key_length", meta.get("rope.dimension_count",
                                                           embed_dim // num_heads)),
        mlp_dim=meta.require("feed_forward_length"),
        norm_eps=meta.get("attention.layer_norm_rms_epsilon", 1e-5),
        rope=meta.rope(),
        layer_types=("sliding" if window else "full",) * num_layers,
        sliding_window=window,
        tie_embeddings=tied,
        max_position=meta.get("context_length", 8192),
        bos_id=meta.token_id("bos"),
        eos_id=meta.token_id("eos"),
    )

