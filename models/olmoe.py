"""OLMoE (OLMoE-1B-7B): Llama's layout with q/k RMSNorms over all heads together, optional
q/k/v clipping, and 64 experts of which 8 are chosen, their weights not renormalised."""

from __future__ import annotations

from jft.models import llama
from jft.models.checkpoint_fields import HFConfig
from jft.models.config import ModelConfig
from jft.models.moe_fields import hf_moe, hf_moe_fields

HF_MODEL_TYPES = ("olmoe",)
GGUF_ARCHITECTURES = ()


def from_hf(hf: HFConfig) -> ModelConfig:
    config = llama.from_hf(hf)
    return config.replace(family="olmoe", moe=hf_moe(hf, "num_experts", norm_topk_default=False),
                          qk_norm_whole=True, clip_qkv=hf.get("clip_qkv"))


def to_hf(config: ModelConfig) -> dict:
    fields = llama.to_hf(config.replace(family="llama"))
    for key in ("mlp_bias", "layer_types", "sliding_window"):
        fields.pop(key, None)
    return {**fields, **hf_moe_fields(config.moe, "num_experts"),
            "model_type": "olmoe", "architectures": ["OlmoeForCausalLM"],
            "clip_qkv": config.clip_qkv}
