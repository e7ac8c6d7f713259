"""Tiny random HF transformers models of every supported family, for parity tests, and
tiny random jft params."""

from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB = 160

# family name -> (transformers config class name, config kwargs)
TINY_CONFIGS = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2)),
    "llama3": (
        "LlamaConfig",
        dict(
            num_key_value_heads=1,
            attention_bias=True,
            mlp_bias=True,
            max_position_embeddings=64,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            rope_theta=500000.0,
        ),
    ),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=5)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=24)),
    "gemma": ("GemmaConfig", dict(num_key_value_heads=1, head_dim=16)),
    "gemma2": (
        "Gemma2Config",
        dict(
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=5,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=4.0,
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            num_hidden_layers=7,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=5,
            query_pre_attn_scalar=12,
            rope_local_base_freq=100.0,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        ),
    ),
}


# Mixture-of-experts families: tiny enough that some experts get no token in a batch.
MOE_CONFIGS = {
    "mixtral": ("MixtralConfig", dict(num_key_value_heads=2, num_local_experts=4,
                                      num_experts_per_tok=2, intermediate_size=32)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_key_value_heads=2, num_experts=4,
                                         num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_key_value_heads=2, num_experts=6,
                                         num_experts_per_tok=2, moe_intermediate_size=32,
                                         norm_topk_prob=True, head_dim=24)),
    "olmoe": ("OlmoeConfig", dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=3,
                                  intermediate_size=32, clip_qkv=2.0)),
}


def make_hf_model(family: str, seed: int = 0):
    """A random fp32 torch model of `family`, weights and norm scales all non-trivial."""
    import torch
    import transformers

    class_name, extra = (TINY_CONFIGS | MOE_CONFIGS)[family]
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        initializer_range=0.15,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(extra)
    config = getattr(transformers, class_name)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.normal_(0.0, 0.2).add_(0.0 if "gemma" in family or "bias" in name else 1.0)
    return model.float().eval()


def save_hf_model(family: str, directory: Path, seed: int = 0):
    model = make_hf_model(family, seed)
    model.save_pretrained(directory)
    return model


def hf_logits(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.tensor(attention_mask)
        out = model(torch.tensor(tokens), **kwargs)
    return out.logits.float().numpy()


def random_params(model, seed=0, std=0.3):
    """Random jft params from numpy (jax.random.normal compiles slowly on CPU): normal
    weights and biases, norm scales near one."""
    import jax
    import jax.numpy as jnp

    from jft.models import param_shapes

    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        noise = std * rng.standard_normal(shape)
        return jnp.asarray(noise + (1.0 if path[-1].key.endswith("norm") else 0.0), jnp.float32)

    return jax.tree.map_with_path(leaf, param_shapes(model),
                                  is_leaf=lambda x: isinstance(x, tuple))


def save_tiny_smollm2(directory: Path, intermediate_size: int = 64, seed: int = 0) -> Path:
    """A tiny random Llama with SmolLM2-135M-Instruct's real tokenizer and chat template
    (read from the bundled GGUF), so data, chat and stop tokens are real while a forward
    pass takes milliseconds."""
    import torch
    import transformers

    from jft.formats.bundled import bundled_path

    gguf = bundled_path("smollm2-135m-instruct")
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(directory)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=intermediate_size,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return Path(directory)
