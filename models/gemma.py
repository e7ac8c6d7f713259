"""Gemma 1: RMSNorm scaled by (1 + w), embeddings times sqrt(D), GeGLU, tied head."""

from __future__ import annotations

from jft.models.checkpoint_fields import GGUFMetadata, HFConfig, hf_activation
from jft.models.config import ModelConfig

HF_MODEL_TYPES = ("gemma",)
GGUF_ARCHITECTURES = ("gemma",)


def from_hf(hf: HFConfig) -> ModelConfig:
    num_heads = hf.require("num_attention_heads")
    num_layers = hf.require("num_hidden_layers")
    head_dim = hf.get("head_dim", hf.require("hidden_size") // num_heads)
    return ModelConfig(
        family="gemma",
        vocab_size=hf.require("vocab_size"),
        embed_dim=hf.require("hidden_size"),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads", num_heads),
        head_dim=head_dim,
        mlp_dim=hf.require("intermediate_size"),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope=hf.rope(),
        layer_types=("full",) * num_layers,
        activation=hf_activation(hf, "hidden_activation", "gelu_pytorch_tanh"),
        qkv_bias=hf.get("attention_bias", False),
        o_bias=hf.get("attention_bias", False),
        norm_plus_one=True,
        embed_scale=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        max_position=hf.get("max_position_embeddings", 8192),
        bos_id=hf.token_id("bos"),
        eos_id=hf.token_id("eos"),
    )


def from_gguf(meta: GGUFMetadata, vocab_size: int, tied: bool) -> ModelConfig:
    num_heads = meta.require("attention.head_count")
    num_layers = meta.require("block_count")
    embed_dim = meta.require("embedding_length")
    return ModelConfig(
        family="gemma",
        vocab_size=vocab_size,
        embed_dim=embed_dim,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=meta.get("attention.head_count_kv", num_heads),
        head_dim=meta.get("attention.key_length", embed_dim // num_heads),
        mlp_dim=meta.require("feed_forward_length"),
        norm_eps=meta.get("attention.layer_norm_rms_epsilon", 1e-6),
        rope=meta.rope(),
        layer_types=("full",) * num_layers,
        activation="gelu_tanh",
        norm_plus_one=True,
        embed_scale=True,
        tie_embeddings=tied,
        max_position=meta.get("context_length", 8192),
        bos_id=meta.token_id("bos"),
        eos_id=meta.token_id("eos"),
    )
