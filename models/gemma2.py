"""Gemma 2: Gemma 1 plus soft-capping, alternating sliding-window layers and post-norms."""

from __future__ import annotations

from jft.models.checkpoint_fields import (
    GGUFMetadata,
    HFConfig,
    hf_layer_type_names,
    hf_layer_types,
)
from jft.models.config import ModelConfig
from jft.models.gemma import GEMMA_TRAITS, hf_fields, hf_gemma_fields

HF_MODEL_TYPES = ("gemma2",)
GGUF_ARCHITECTURES = ("gemma2",)


def from_hf(hf: HFConfig) -> ModelConfig:
    fields = hf_fields(hf, default_head_dim=256)
    num_layers = fields["num_layers"]
    # Even layers slide, odd layers see everything.
    default_types = [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)
    ]
    return ModelConfig(
        family="gemma2",
        **fields,
        rope=hf.rope(),
        layer_types=hf_layer_types(hf, num_layers, default_types),
        sliding_window=hf.get("sliding_window", 4096),
        post_norms=True,
        query_scale=hf.get("query_pre_attn_scalar", fields["head_dim"]) ** -0.5,
        attn_softcap=hf.get("attn_logit_softcapping"),
        final_softcap=hf.get("final_logit_softcapping"),
    )


def from_gguf(meta: GGUFMetadata, vocab_size: int, tied: bool) -> ModelConfig:
    common = meta.common(vocab_size, tied, default_head_dim=256)
    num_layers = common["num_layers"]
    return ModelConfig(
        family="gemma2",
        **common,
        **GEMMA_TRAITS,
        rope=meta.rope(),
        layer_types=tuple("sliding" if (i + 1) % 2 else "full" for i in range(num_layers)),
        sliding_window=meta.get("attention.sliding_window", 4096),
        activation="gelu_tanh",
        post_norms=True,
        query_scale=gguf_query_scale(common, big_layers=46),
        attn_softcap=meta.get("attn_logit_softcapping", 50.0),
        final_softcap=meta.get("final_logit_softcapping", 30.0),
    )


def gguf_query_scale(common: dict, big_layers: int) -> float:
    """GGUF omits query_pre_attn_scalar; like llama.cpp, the 27B size scales by D / N."""
    if common["num_layers"] == big_layers:
        return (common["embed_dim"] // common["num_heads"]) ** -0.5
    return common["head_dim"] ** -0.5


def hf_attention_fields(config: ModelConfig) -> dict:
    """Gemma 2/3's sliding layers, query scale and soft-caps."""
    return {
        "sliding_window": config.sliding_window,
        "layer_types": hf_layer_type_names(config),
        "query_pre_attn_scalar": round(config.scale**-2),  # an int in HF's schema
        "attn_logit_softcapping": config.attn_softcap,
        "final_logit_softcapping": config.final_softcap,
    }


def to_hf(config: ModelConfig) -> dict:
    """config.json for Gemma2ForCausalLM."""
    return {**hf_gemma_fields(config, "gemma2", "Gemma2ForCausalLM"),
            **hf_attention_fields(config)}
