"""Llama 2, Llama 3 / 3.1 / 3.2 (llama3 rope scaling), Mistral and SmolLM2."""

from __future__ import annotations

from jft.errors import JftError
from jft.models.checkpoint_fields import (
    GGUFMetadata,
    HFConfig,
    hf_common,
    hf_layer_type_names,
    hf_layer_types,
)
from jft.models.config import ModelConfig

HF_MODEL_TYPES = ("llama", "mistral")
GGUF_ARCHITECTURES = ("llama",)


def from_hf(hf: HFConfig) -> ModelConfig:
    common = hf.common()
    window = hf.get("sliding_window")
    default_types = ["sliding_attention" if window else "full_attention"] * common["num_layers"]
    return ModelConfig(
        family="llama",
        **common,
        rope=hf.rope(),
        layer_types=hf_layer_types(hf, common["num_layers"], default_types),
        sliding_window=window,
        qkv_bias=hf.get("attention_bias", False),
        o_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
    )


def from_gguf(meta: GGUFMetadata, vocab_size: int, tied: bool) -> ModelConfig:
    common = meta.common(vocab_size, tied, default_head_dim=meta.get("rope.dimension_count"))
    common["norm_eps"] = meta.get("attention.layer_norm_rms_epsilon", 1e-5)
    window = meta.get("attention.sliding_window")
    return ModelConfig(
        family="llama",
        **common,
        rope=meta.rope(),
        layer_types=("sliding" if window else "full",) * common["num_layers"],
        sliding_window=window,
    )


def to_hf(config: ModelConfig) -> dict:
    """config.json for LlamaForCausalLM."""
    if config.qkv_bias != config.o_bias:
        raise JftError("Llama's config.json has one attention_bias for q/k/v and o; this "
                       "model has biases on only some of them")
    return {
        **hf_common(config, "llama", "LlamaForCausalLM"),
        "hidden_act": "silu",
        "attention_bias": config.qkv_bias,
        "mlp_bias": config.mlp_bias,
        "sliding_window": config.sliding_window,
        "layer_types": hf_layer_type_names(config),
    }
