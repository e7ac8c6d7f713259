"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention, every layer's MLP
top-k routed experts with the chosen weights renormalised (`norm_topk_prob`)."""

from __future__ import annotations

from jft.models import qwen2
from jft.models.checkpoint_fields import GGUFMetadata, HFConfig
from jft.models.config import ModelConfig
from jft.models.moe_fields import gguf_moe, hf_moe, hf_moe_fields

HF_MODEL_TYPES = ("qwen3_moe",)
GGUF_ARCHITECTURES = ("qwen3moe",)


def from_hf(hf: HFConfig) -> ModelConfig:
    # Qwen3-MoE calls it num_experts; transformers 5 also writes num_local_experts.
    key = "num_experts" if hf.get("num_experts") else "num_local_experts"
    config = qwen2.from_hf(hf, family="qwen3")
    return config.replace(family="qwen3_moe", moe=hf_moe(hf, key, norm_topk_default=False))


def from_gguf(meta: GGUFMetadata, vocab_size: int, tied: bool) -> ModelConfig:
    config = qwen2.from_gguf(meta, vocab_size, tied, family="qwen3")
    # llama.cpp's qwen3moe always renormalises the top-k weights (transformers' GGUF
    # loader defaults norm_topk_prob to true for it to match); the file does not say.
    return config.replace(family="qwen3_moe", moe=gguf_moe(meta, norm_topk=True))


def to_hf(config: ModelConfig) -> dict:
    fields = qwen2.to_hf(config.replace(family="qwen3"))
    moe = config.moe
    return {**fields, **hf_moe_fields(moe, "num_experts", moe_intermediate_size=moe.expert_mlp_dim,
                                      decoder_sparse_step=1, mlp_only_layers=[]),
            "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
            "intermediate_size": moe.dense_mlp_dim or config.mlp_dim}
