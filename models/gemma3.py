"""Gemma 3 (text): q/k norms, five sliding layers per full one, separate rope bases."""

from __future__ import annotations

from jft.models.checkpoint_fields import GGUFMetadata, HFConfig, hf_activation, hf_layer_types
from jft.models.config import ModelConfig, RopeConfig
from jft.models.gemma2 import gguf_query_scale

HF_MODEL_TYPES = ("gemma3_text", "gemma3")
GGUF_ARCHITECTURES = ("gemma3",)
_PATTERN = 6  # every sixth layer is global


def from_hf(hf: HFConfig) -> ModelConfig:
    if hf.get("text_config"):  # the multimodal wrapper: keep the language model
        hf = HFConfig(dict(hf.fields["text_config"]), hf.source)
    num_layers = hf.require("num_hidden_layers")
    num_heads = hf.require("num_attention_heads")
    head_dim = hf.get("head_dim", 256)
    pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", _PATTERN))
    default_types = [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
        for i in range(num_layers)
    ]
    if isinstance(hf.get("rope_parameters"), dict) and "full_attention" in hf.fields[
        "rope_parameters"
    ]:
        rope, local_rope = hf.rope("full_attention"), hf.rope("sliding_attention")
    else:
        rope, local_rope = hf.rope(), RopeConfig(theta=hf.get("rope_local_base_freq", 10000.0))
    return ModelConfig(
        family="gemma3",
        vocab_size=hf.require("vocab_size"),
        embed_dim=hf.require("hidden_size"),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads", num_heads),
        head_dim=head_dim,
        mlp_dim=hf.require("intermediate_size"),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope=rope,
        local_rope=local_rope,
        layer_types=hf_layer_types(hf, num_layers, default_types),
        sliding_window=hf.get("sliding_window", 4096),
        activation=hf_activation(hf, "hidden_activation", "gelu_pytorch_tanh"),
        qkv_bias=hf.get("attention_bias", False),
        o_bias=hf.get("attention_bias", False),
        qk_norm=True,
        post_norms=True,
        norm_plus_one=True,
        embed_scale=True,
        query_scale=hf.get("query_pre_attn_scalar", head_dim) ** -0.5,
        attn_softcap=hf.get("attn_logit_softcapping"),
        final_softcap=hf.get("final_logit_softcapping"),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        max_position=hf.get("max_position_embeddings", 131072),
        bos_id=hf.token_id("bos"),
        eos_id=hf.token_id("eos"),
    )


def from_gguf(meta: GGUFMetadata, vocab_size: int, tied: bool) -> ModelConfig:
    num_layers = meta.require("block_count")
    num_heads = meta.require("attention.head_count")
    embed_dim = meta.require("embedding_length")
    head_dim = meta.get("attention.key_length", 256)
    return ModelConfig(
        family="gemma3",
        vocab_size=vocab_size,
        embed_dim=embed_dim,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=meta.get("attention.head_count_kv", num_heads),
        head_dim=head_dim,
        mlp_dim=meta.require("feed_forward_length"),
        norm_eps=meta.get("attention.layer_norm_rms_epsilon", 1e-6),
        rope=meta.rope(default_theta=1_000_000.0),
        local_rope=RopeConfig(theta=float(meta.get("rope.freq_base_swa", 10000.0))),
        layer_types=tuple(
            "full" if (i + 1) % _PATTERN == 0 else "sliding" for i in range(num_layers)
        ),
        sliding_window=meta.get("attention.sliding_window", 4096),
        activation="gelu_tanh",
        qk_norm=True,
        post_norms=True,
        norm_plus_one=True,
        embed_scale=True,
        query_scale=gguf_query_scale(num_layers, embed_dim, num_heads, head_dim, big_layers=62),
        attn_softcap=meta.get("attn_logit_softcapping"),
        final_softcap=meta.get("final_logit_softcapping"),
        tie_embeddings=tied,
        max_position=meta.get("context_length", 131072),
        bos_id=meta.token_id("bos"),
        eos_id=meta.token_id("eos"),
    )
