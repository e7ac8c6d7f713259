"""Qwen2 and Qwen2.5: Llama-like, with biases on the q/k/v projections."""

from __future__ import annotations

from jft.models.checkpoint_fields import (
    GGUFMetadata,
    HFConfig,
    hf_common,
    hf_layer_type_names,
    hf_layer_types,
)
from jft.models.config import ModelConfig

HF_MODEL_TYPES = ("qwen2",)
GGUF_ARCHITECTURES = ("qwen2",)


def from_hf(hf: HFConfig, family: str = "qwen2") -> ModelConfig:
    common = hf.common(max_position=32768)
    num_layers = common["num_layers"]
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
        **common,
        rope=hf.rope(),
        layer_types=layer_types,
        sliding_window=hf.get("sliding_window") if "sliding" in layer_types else None,
        qkv_bias=hf.get("attention_bias", False) if qwen3 else True,
        o_bias=hf.get("attention_bias", False) if qwen3 else False,
        qk_norm=qwen3,
    )


def from_gguf(meta: GGUFMetadata, vocab_size: int, tied: bool, family: str = "qwen2"):
    common = meta.common(vocab_size, tied, max_position=32768)
    return ModelConfig(
        family=family,
        **common,
        rope=meta.rope(),
        layer_types=("full",) * common["num_layers"],
        qk_norm=family == "qwen3",
    )


def to_hf(config: ModelConfig) -> dict:
    """config.json for Qwen2ForCausalLM / Qwen3ForCausalLM."""
    qwen3 = config.family == "qwen3"
    name = "Qwen3ForCausalLM" if qwen3 else "Qwen2ForCausalLM"
    fields = {
        **hf_common(config, config.family, name),
        "hidden_act": "silu",
        "use_sliding_window": config.sliding_window is not None,
        "sliding_window": config.sliding_window,
        "max_window_layers": next((i for i, t in enumerate(config.layer_types)
                                   if t == "sliding"), config.num_layers),
        "layer_types": hf_layer_type_names(config),
    }
    if qwen3:
        fields["attention_bias"] = config.qkv_bias
    return fields
