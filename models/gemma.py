"""Gemma 1: RMSNorm scaled by (1 + w), embeddings times sqrt(D), GeGLU, tied head."""

from __future__ import annotations

from jft.models.checkpoint_fields import (
    GGUFMetadata,
    HFConfig,
    hf_activation,
    hf_activation_name,
    hf_common,
)
from jft.models.config import ModelConfig

HF_MODEL_TYPES = ("gemma",)
GGUF_ARCHITECTURES = ("gemma",)

# What every Gemma generation shares.
GEMMA_TRAITS = dict(norm_plus_one=True, embed_scale=True)


def hf_fields(hf: HFConfig, **common_options) -> dict:
    """Common fields plus Gemma's traits, activation and (rare) attention biases."""
    return dict(
        **hf.common(tie=True, **common_options),
        **GEMMA_TRAITS,
        activation=hf_activation(hf, "hidden_activation", "gelu_pytorch_tanh"),
        qkv_bias=hf.get("attention_bias", False),
        o_bias=hf.get("attention_bias", False),
    )


def from_hf(hf: HFConfig) -> ModelConfig:
    fields = hf_fields(hf)
    return ModelConfig(
        family="gemma", **fields, rope=hf.rope(), layer_types=("full",) * fields["num_layers"]
    )


def from_gguf(meta: GGUFMetadata, vocab_size: int, tied: bool) -> ModelConfig:
    common = meta.common(vocab_size, tied)
    return ModelConfig(
        family="gemma",
        **common,
        **GEMMA_TRAITS,
        rope=meta.rope(),
        layer_types=("full",) * common["num_layers"],
        activation="gelu_tanh",
    )


def hf_gemma_fields(config: ModelConfig, model_type: str, architecture: str) -> dict:
    """What every Gemma generation writes (norms as w: HF computes x * (1 + w) itself)."""
    return {
        **hf_common(config, model_type, architecture),
        "hidden_activation": hf_activation_name(config),
        "attention_bias": config.qkv_bias,
    }


def to_hf(config: ModelConfig) -> dict:
    """config.json for GemmaForCausalLM."""
    return hf_gemma_fields(config, "gemma", "GemmaForCausalLM")
