"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention (q/k/v biases), routed
experts plus a shared expert every token goes through, scaled by a sigmoid gate."""

from __future__ import annotations

from jft.models import qwen2
from jft.models.checkpoint_fields import GGUFMetadata, HFConfig
from jft.models.config import ModelConfig
from jft.models.moe_fields import gguf_moe, hf_moe, hf_moe_fields

HF_MODEL_TYPES = ("qwen2_moe",)
GGUF_ARCHITECTURES = ("qwen2moe",)


def from_hf(hf: HFConfig) -> ModelConfig:
    key = "num_experts" if hf.get("num_experts") else "num_local_experts"
    config = qwen2.from_hf(hf)
    moe = hf_moe(hf, key, norm_topk_default=False, shared_expert=True, shared_gate=True)
    # The shared expert is the model's own MLP sites, at the shared expert's width.
    return config.replace(family="qwen2_moe", moe=moe,
                          mlp_dim=hf.require("shared_expert_intermediate_size"))


def from_gguf(meta: GGUFMetadata, vocab_size: int, tied: bool) -> ModelConfig:
    config = qwen2.from_gguf(meta, vocab_size, tied)
    # llama.cpp's qwen2moe keeps the top-k softmax weights as they are (no renormalising:
    # transformers' Qwen2-MoE default, norm_topk_prob: false); the file does not say.
    moe = gguf_moe(meta, norm_topk=False, shared_expert=True, shared_gate=True)
    # The shared expert's width; llama.cpp falls back to the dense feed_forward_length.
    shared = meta.get("expert_shared_feed_forward_length") or moe.dense_mlp_dim
    return config.replace(family="qwen2_moe", moe=moe, mlp_dim=shared)


def to_hf(config: ModelConfig) -> dict:
    fields = qwen2.to_hf(config.replace(family="qwen2"))
    moe = config.moe
    return {**fields, **hf_moe_fields(moe, "num_experts", moe_intermediate_size=moe.expert_mlp_dim,
                                      shared_expert_intermediate_size=config.mlp_dim,
                                      decoder_sparse_step=1, mlp_only_layers=[]),
            "model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"],
            "intermediate_size": moe.dense_mlp_dim or config.mlp_dim}
