"""Mixtral (8x7B, 8x22B): Mistral's attention, top-2 of 8 experts, the two chosen
weights renormalised (a softmax over the chosen). Checkpoints name the MoE
`block_sparse_moe` and its experts' projections w1 (gate), w3 (up), w2 (down);
transformers 5 calls the module `mlp`, which is the name PEFT adapters use."""

from __future__ import annotations

from jft.models import llama
from jft.models.checkpoint_fields import HFConfig
from jft.models.config import ModelConfig
from jft.models.moe_fields import hf_moe, hf_moe_fields

HF_MODEL_TYPES = ("mixtral",)
GGUF_ARCHITECTURES = ()
# How the checkpoint names the MoE module and each expert's gate, up and down.
CHECKPOINT_EXPERTS = ("block_sparse_moe", ("w1", "w3", "w2"))


def from_hf(hf: HFConfig) -> ModelConfig:
    config = llama.from_hf(hf)
    moe = hf_moe(hf, "num_local_experts", norm_topk_default=True)
    return config.replace(family="mixtral", moe=moe)


def to_hf(config: ModelConfig) -> dict:
    fields = llama.to_hf(config.replace(family="llama"))
    for key in ("attention_bias", "mlp_bias", "layer_types"):
        fields.pop(key, None)
    return {**fields, **hf_moe_fields(config.moe, "num_local_experts"),
            "model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
            "router_jitter_noise": 0.0}
