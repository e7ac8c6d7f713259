"""Reading architecture fields from HF `config.json` and GGUF metadata, with clear errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jft.errors import JftError
from jft.models.config import ModelConfig, RopeConfig

_MISSING = object()


@dataclass
class HFConfig:
    """A parsed `config.json`; `require` names the file and the field when one is absent."""

    fields: dict[str, Any]
    source: str

    def get(self, key: str, default: Any = None) -> Any:
        value = self.fields.get(key, default)
        return default if value is None else value

    def require(self, key: str) -> Any:
        value = self.fields.get(key, _MISSING)
        if value is _MISSING or value is None:
            raise JftError(f"{self.source}: config field {key!r} is missing")
        return value

    def token_id(self, name: str) -> int | None:
        """`bos_token_id` / `eos_token_id`; a list (several stop tokens) gives its first."""
        value = self.get(f"{name}_token_id")
        return value[0] if isinstance(value, list) and value else value

    def common(self, default_head_dim: int | None = None, tie: bool = False,
               max_position: int = 8192) -> dict[str, Any]:
        """The ModelConfig fields every family reads the same way."""
        embed_dim = self.require("hidden_size")
        num_heads = self.require("num_attention_heads")
        return dict(
            vocab_size=self.require("vocab_size"),
            embed_dim=embed_dim,
            num_layers=self.require("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=self.get("num_key_value_heads", num_heads),
            head_dim=self.get("head_dim", default_head_dim or embed_dim // num_heads),
            mlp_dim=self.require("intermediate_size"),
            norm_eps=self.get("rms_norm_eps", 1e-6),
            tie_embeddings=self.get("tie_word_embeddings", tie),
            max_position=self.get("max_position_embeddings", max_position),
            bos_id=self.token_id("bos"),
            eos_id=self.token_id("eos"),
        )

    def rope(self, layer_type: str | None = None) -> RopeConfig:
        """Rope settings: transformers v5 `rope_parameters`, or v4 `rope_theta`/`rope_scaling`."""
        params = self.fields.get("rope_parameters")
        if isinstance(params, dict) and layer_type is not None and layer_type in params:
            params = params[layer_type]
        if not isinstance(params, dict):
            params = dict(self.get("rope_scaling", {}))
            params.setdefault("rope_theta", self.get("rope_theta", 10000.0))
        return rope_from_fields(params, self.source)


def rope_from_fields(params: dict[str, Any], source: str) -> RopeConfig:
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ("default", "linear", "llama3"):
        raise JftError(
            f"{source}: rope type {kind!r} is not supported; supported: default, linear, llama3"
        )
    fields: dict[str, Any] = {"theta": float(params.get("rope_theta", 10000.0)), "kind": kind}
    if kind in ("linear", "llama3"):
        fields["factor"] = float(params["factor"])
    if kind == "llama3":
        fields["low_freq_factor"] = float(params.get("low_freq_factor", 1.0))
        fields["high_freq_factor"] = float(params.get("high_freq_factor", 4.0))
        fields["original_max_position"] = int(params["original_max_position_embeddings"])
    return RopeConfig(**fields)


@dataclass
class GGUFMetadata:
    """GGUF key/values of one architecture; keys are given without the `arch.` prefix."""

    fields: dict[str, Any]
    architecture: str
    source: str
    rope_freq_factors: tuple[float, ...] | None = None

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(f"{self.architecture}.{key}", default)

    def require(self, key: str) -> Any:
        full = f"{self.architecture}.{key}"
        if full not in self.fields:
            raise JftError(f"{self.source}: GGUF metadata key {full!r} is missing")
        return self.fields[full]

    def token_id(self, name: str) -> int | None:
        value = self.fields.get(f"tokenizer.ggml.{name}_token_id")
        return None if value is None else int(value)

    def common(self, vocab_size: int, tied: bool, default_head_dim: int | None = None,
               max_position: int = 8192) -> dict[str, Any]:
        """The ModelConfig fields every family reads the same way. Biases are set by the
        loader from the tensors present."""
        embed_dim = self.require("embedding_length")
        num_heads = self.require("attention.head_count")
        return dict(
            vocab_size=vocab_size,
            embed_dim=embed_dim,
            num_layers=self.require("block_count"),
            num_heads=num_heads,
            num_kv_heads=self.get("attention.head_count_kv", num_heads),
            head_dim=self.get("attention.key_length", default_head_dim or embed_dim // num_heads),
            mlp_dim=self.require("feed_forward_length"),
            norm_eps=self.get("attention.layer_norm_rms_epsilon", 1e-6),
            tie_embeddings=tied,
            max_position=self.get("context_length", max_position),
            bos_id=self.token_id("bos"),
            eos_id=self.token_id("eos"),
        )

    def rope(self, theta_key: str = "rope.freq_base", default_theta: float = 10000.0) -> RopeConfig:
        kind = self.get("rope.scaling.type", "none")
        theta = float(self.get(theta_key, default_theta))
        if kind in ("none", None) or self.get("rope.scaling.factor", 1.0) == 1.0:
            return RopeConfig(theta=theta, freq_factors=self.rope_freq_factors)
        if kind != "linear":
            raise JftError(
                f"{self.source}: GGUF rope scaling {kind!r} is not supported; supported: linear"
            )
        factor = float(self.require("rope.scaling.factor"))
        return RopeConfig(theta=theta, kind="linear", factor=factor,
                          freq_factors=self.rope_freq_factors)


def hf_layer_types(hf: HFConfig, num_layers: int, default: list[str]) -> tuple[str, ...]:
    """`layer_types` from config.json (`sliding_attention`/`full_attention`), else `default`."""
    names = hf.get("layer_types") or default
    mapping = {"sliding_attention": "sliding", "full_attention": "full"}
    if len(names) != num_layers or any(name not in mapping for name in names):
        raise JftError(
            f"{hf.source}: layer_types must list {num_layers} entries of "
            "'sliding_attention' or 'full_attention'"
        )
    return tuple(mapping[name] for name in names)


def hf_activation(hf: HFConfig, key: str, default: str) -> str:
    name = hf.get(key, default)
    mapping = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh", "gelu": "gelu"}
    if name not in mapping:
        raise JftError(f"{hf.source}: {key}={name!r} is not supported; supported: {list(mapping)}")
    return mapping[name]


# ---------------------------------------------------------------- writing config.json


def hf_common(config: ModelConfig, model_type: str, architecture: str) -> dict[str, Any]:
    """The config.json fields every family writes the same way (inverse of `common`)."""
    c = config
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.embed_dim,
        "intermediate_size": c.mlp_dim,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "rms_norm_eps": c.norm_eps,
        "max_position_embeddings": c.max_position,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": c.bos_id,
        "eos_token_id": c.eos_id,
        **hf_rope(c.rope),
    }


def hf_rope(rope: RopeConfig) -> dict[str, Any]:
    """`rope_theta` and `rope_scaling`: the form transformers 4 and 5 both read."""
    if rope.freq_factors is not None:
        raise JftError("this model's rope comes as llama.cpp per-frequency factors "
                       "(rope_freqs), which config.json cannot express; export from the "
                       "original HF checkpoint instead")
    fields: dict[str, Any] = {"rope_theta": rope.theta}
    if rope.kind == "linear":
        fields["rope_scaling"] = {"rope_type": "linear", "factor": rope.factor}
    elif rope.kind == "llama3":
        fields["rope_scaling"] = {
            "rope_type": "llama3", "factor": rope.factor,
            "low_freq_factor": rope.low_freq_factor, "high_freq_factor": rope.high_freq_factor,
            "original_max_position_embeddings": rope.original_max_position,
        }
    return fields


def hf_layer_type_names(config: ModelConfig) -> list[str]:
    return [f"{t}_attention" for t in config.layer_types]


_HF_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}


def hf_activation_name(config: ModelConfig) -> str:
    return _HF_ACTIVATIONS[config.activation]
