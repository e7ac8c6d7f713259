"""Reading and writing the MoE fields of an HF `config.json`, and reading those of a GGUF
file's metadata, shared by the MoE families."""

from __future__ import annotations

from typing import Any

from jft.errors import JftError
from jft.models.checkpoint_fields import GGUFMetadata, HFConfig
from jft.models.config import MoeConfig


def hf_moe(hf: HFConfig, experts_key: str, norm_topk_default: bool, **fields) -> MoeConfig:
    """The routed experts of a config.json; every layer must be sparse."""
    num_layers = hf.require("num_hidden_layers")
    dense = sorted(set(hf.get("mlp_only_layers", [])))
    step = hf.get("decoder_sparse_step", 1)
    dense += [i for i in range(num_layers) if (i + 1) % step and i not in dense]
    if dense:
        raise JftError(f"{hf.source}: layers {dense} have a dense MLP (mlp_only_layers / "
                       f"decoder_sparse_step={step}); jft runs MoE models whose layers are "
                       "all sparse (mlp_only_layers: [], decoder_sparse_step: 1)")
    return MoeConfig(
        num_experts=hf.require(experts_key),
        top_k=hf.require("num_experts_per_tok"),
        expert_mlp_dim=hf.get("moe_intermediate_size", hf.get("intermediate_size")),
        norm_topk=hf.get("norm_topk_prob", norm_topk_default),
        aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
        dense_mlp_dim=hf.get("intermediate_size"),
        **fields,
    )


def hf_moe_fields(moe: MoeConfig, experts_key: str, **extra) -> dict[str, Any]:
    """config.json fields of the routed experts (inverse of `hf_moe`)."""
    return {
        experts_key: moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": moe.norm_topk,
        "router_aux_loss_coef": moe.aux_loss_coef,
        "output_router_logits": False,
        **extra,
    }


def gguf_moe(meta: GGUFMetadata, norm_topk: bool, **fields) -> MoeConfig:
    """The routed experts of a llama.cpp GGUF file. llama.cpp runs every layer of these
    architectures sparse and fixes their routing (`norm_topk`) in code, so the file states
    neither; without `expert_feed_forward_length` (files older than the key) an expert's
    width is llama.cpp's fallback, feed_forward_length / expert_used_count."""
    top_k = meta.require("expert_used_count")
    dense = meta.require("feed_forward_length")
    return MoeConfig(
        num_experts=meta.require("expert_count"),
        top_k=top_k,
        expert_mlp_dim=meta.get("expert_feed_forward_length") or dense // top_k,
        norm_topk=norm_topk,
        dense_mlp_dim=dense,
        **fields,
    )
