"""Gemma 3 (text): q/k norms, five sliding layers per full one, separate rope bases."""

from __future__ import annotations

from jft.models.checkpoint_fields import GGUFMetadata, HFConfig, hf_layer_types
from jft.models.config import ModelConfig, RopeConfig
from jft.models.gemma import GEMMA_TRAITS, hf_fields, hf_gemma_fields
from jft.models.gemma2 import gguf_query_scale, hf_attention_fields

HF_MODEL_TYPES = ("gemma3_text", "gemma3")
GGUF_ARCHITECTURES = ("gemma3",)
_PATTERN = 6  # every sixth layer is global


def from_hf(hf: HFConfig) -> ModelConfig:
    if hf.get("text_config"):  # the multimodal wrapper: keep the language model
        hf = HFConfig(dict(hf.fields["text_config"]), hf.source)
    fields = hf_fields(hf, default_head_dim=256, max_position=131072)
    num_layers = fields["num_layers"]
    pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", _PATTERN))
    default_types = [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
        for i in range(num_layers)
    ]
    if "full_attention" in (hf.get("rope_parameters") or {}):
        rope, local_rope = hf.rope("full_attention"), hf.rope("sliding_attention")
    else:
        rope, local_rope = hf.rope(), RopeConfig(theta=hf.get("rope_local_base_freq", 10000.0))
    return ModelConfig(
        family="gemma3",
        **fields,
        rope=rope,
        local_rope=local_rope,
        layer_types=hf_layer_types(hf, num_layers, default_types),
        sliding_window=hf.get("sliding_window", 4096),
        qk_norm=True,
        post_norms=True,
        query_scale=hf.get("query_pre_attn_scalar", fields["head_dim"]) ** -0.5,
        attn_softcap=hf.get("attn_logit_softcapping"),
        final_softcap=hf.get("final_logit_softcapping"),
    )


def from_gguf(meta: GGUFMetadata, vocab_size: int, tied: bool) -> ModelConfig:
    common = meta.common(vocab_size, tied, default_head_dim=256, max_position=131072)
    num_layers = common["num_layers"]
    return ModelConfig(
        family="gemma3",
        **common,
        **GEMMA_TRAITS,
        rope=meta.rope(default_theta=1_000_000.0),
        local_rope=RopeConfig(theta=float(meta.get("rope.freq_base_swa", 10000.0))),
        layer_types=tuple(
            "full" if (i + 1) % _PATTERN == 0 else "sliding" for i in range(num_layers)
        ),
        sliding_window=meta.get("attention.sliding_window", 4096),
        activation="gelu_tanh",
        qk_norm=True,
        post_norms=True,
        query_scale=gguf_query_scale(common, big_layers=62),
        attn_softcap=meta.get("attn_logit_softcapping"),
        final_softcap=meta.get("final_logit_softcapping"),
    )


def to_hf(config: ModelConfig) -> dict:
    """config.json for Gemma3ForCausalLM (the text model)."""
    local = config.local_rope or config.rope
    return {**hf_gemma_fields(config, "gemma3_text", "Gemma3ForCausalLM"),
            **hf_attention_fields(config),
            "rope_local_base_freq": local.theta}
