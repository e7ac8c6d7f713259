"""Qwen3: Qwen2's layout with RMSNorm on queries and keys, and no q/k/v bias."""

from __future__ import annotations

from jft.models import qwen2
from jft.models.checkpoint_fields import GGUFMetadata, HFConfig
from jft.models.config import ModelConfig

HF_MODEL_TYPES = ("qwen3",)
GGUF_ARCHITECTURES = ("qwen3",)


def from_hf(hf: HFConfig) -> ModelConfig:
    return qwen2.from_hf(hf, family="qwen3")


def from_gguf(meta: GGUFMetadata, vocab_size: int, tied: bool) -> ModelConfig:
    return qwen2.from_gguf(meta, vocab_size, tied, family="qwen3")


def to_hf(config: ModelConfig) -> dict:
    return qwen2.to_hf(config)
