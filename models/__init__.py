"""Model families: one file each, all sharing `transformer.forward`.

A family file turns its checkpoint's config (HF `config.json` or GGUF metadata) into
a `ModelConfig`; the registry below picks the family from `model_type` or
`general.architecture`.
"""

from __future__ import annotations

from types import ModuleType

from jft.errors import JftError
from jft.models import (
    gemma,
    gemma2,
    gemma3,
    llama,
    mixtral,
    olmoe,
    qwen2,
    qwen2_moe,
    qwen3,
    qwen3_moe,
)
from jft.models.checkpoint_fields import GGUFMetadata, HFConfig
from jft.models.config import ModelConfig, MoeConfig, RopeConfig, RuntimePolicy
from jft.models.sites import LinearSite, linear_sites
from jft.models.transformer import (
    PARAM_AXES,
    forward,
    init_cache,
    init_params,
    output_logits,
    param_axes,
    param_shapes,
)

FAMILIES: tuple[ModuleType, ...] = (llama, qwen2, qwen3, gemma, gemma2, gemma3, mixtral,
                                    qwen2_moe, qwen3_moe, olmoe)

__all__ = [
    "FAMILIES",
    "PARAM_AXES",
    "LinearSite",
    "ModelConfig",
    "MoeConfig",
    "RopeConfig",
    "RuntimePolicy",
    "config_from_gguf",
    "config_from_hf",
    "forward",
    "init_cache",
    "init_params",
    "linear_sites",
    "output_logits",
    "param_axes",
    "param_shapes",
]


def config_from_hf(fields: dict, source: str) -> ModelConfig:
    """The ModelConfig for an HF `config.json` (parsed into `fields`)."""
    hf = HFConfig(fields, source)
    model_type = hf.require("model_type")
    for family in FAMILIES:
        if model_type in family.HF_MODEL_TYPES:
            return family.from_hf(hf)
    supported = sorted(t for family in FAMILIES for t in family.HF_MODEL_TYPES)
    raise JftError(f"{source}: model_type {model_type!r} is not supported; supported: {supported}")


def config_from_gguf(meta: GGUFMetadata, vocab_size: int, tied: bool) -> ModelConfig:
    for family in FAMILIES:
        if meta.architecture in family.GGUF_ARCHITECTURES:
            return family.from_gguf(meta, vocab_size, tied)
    supported = sorted(a for family in FAMILIES for a in family.GGUF_ARCHITECTURES)
    raise JftError(
        f"{meta.source}: GGUF architecture {meta.architecture!r} is not supported; "
        f"supported: {supported}"
    )
