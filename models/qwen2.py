"""Qwen2 and Qwen2.5: Llama-like, with biases on the q/k/v projections."""

from __future__ import annotations

from jft.models.checkpoint_fields import GGUFMetadata, HFConfig, hf_layer_types
from jft.models.config import ModelConfig

HF_MODEL_TYPES = ("qwen2",)
GGUF_ARCHITECTURES = ("qwen2",)


def from_hf(hf: HFConfig, family: str = "qwen2") -> ModelConfig:
    embed_dim = hf.require("hidden_size")
    num_heads = hf.require("num_attention_heads")
    num_layers = hf.require("num_hidden_layers")
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    # Qwen's sliding window applies from layer `max_window_layers` on.
    first_sliding = hf.get("max_window_layers", num_layers)
    default_types = [
        "sliding_attention" if window and i >= first_sliding else "full_attention"
        for i in range(num_layers)
    ]
    layer_types = hf_layer_types(hf, num_layers, default_types)
    qwen3 = family == "qwen3"
    return ModelConfig(
        family=family,
        vocab_size=hf.require("vocab_size"),
        embed_dim=embed_dim,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads", num_heads),
        head_dim=hf.get("head_dim", embed_dim // num_heads),
        mlp_dim=hf.require("intermediate_size"),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope=hf.rope(),
        layer_types=layer_types,
        sliding_window=hf.get("sliding_window") if "sliding" in layer_types else None,
        qkv_bias=hf.get("attention_bias", False) if qwen3 else True,
        o_bias=hf.get("attention_bias", False) if qwen3 else False,
        qk_norm=qwen3,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        max_position=hf.get("max_position_embeddings", 32768),
        bos_id=hf.token_id("bos"),
        eos_id=hf.token_id("eos"),
    )


def from_gguf(meta: GGUFMetadata, vocab_size: int, tied: bool, family: str = "qwen2"):
    embed_dim = meta.require("embedding_length")
    num_heads = meta.require("attention.head_count")
    num_layers = meta.require("block_count")
    return ModelConfig(
        family=family,
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
        qk_norm=family == "qwen3",
        tie_embeddings=tied,
        max_position=meta.get("context_length", 32768),
        bos_id=meta.token_id("bos"),
        eos_id=meta.token_id("eos"),
    )
