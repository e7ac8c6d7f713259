"""Loading a model from an HF directory, a `.gguf` file or a bundled name.

Params are built leaf by leaf: each checkpoint tensor is read, laid out, cast to the
target dtype and written into its slot of a layer-stacked device buffer that is
donated back each time, so host memory holds one tensor beyond the model itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jft import default_chat_templates
from jft.bundled import BUNDLED, bundled_path
from jft.errors import JftError
from jft.gguf_file import GGUFFile
from jft.models import ModelConfig, config_from_gguf, config_from_hf, param_shapes
from jft.models.checkpoint_fields import GGUFMetadata
from jft.models.tensor_names import TOP_LEVEL, TensorSource, layer_sources
from jft.safetensors_io import SafetensorsFile

if TYPE_CHECKING:
    from jft.tokenizer import Tokenizer

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class Checkpoint:
    config: ModelConfig
    params: dict[str, Any]
    tokenizer: Tokenizer | None
    source: Path


def load_checkpoint(model: str | Path, dtype: str = "float32") -> Checkpoint:
    """Loads a bundled name, an HF directory or a `.gguf` file with params in `dtype`."""
    path = resolve(model)
    if path.suffix == ".gguf":
        return _load_gguf(path, jnp.dtype(dtype))
    return _load_hf_dir(path, jnp.dtype(dtype))


def resolve(model: str | Path) -> Path:
    if isinstance(model, str) and model in BUNDLED:
        return bundled_path(model)
    path = Path(model).expanduser()
    if not path.exists():
        raise JftError(
            f"{path}: no such file or directory; give an HF model directory, a .gguf file "
            f"or a bundled name ({', '.join(BUNDLED)})"
        )
    if path.suffix in _PICKLE_SUFFIXES:
        raise JftError(
            f"{path}: pickle checkpoints are refused (they can run code when loaded); "
            "convert it to safetensors or GGUF"
        )
    if path.is_file() and path.suffix != ".gguf":
        raise JftError(f"{path}: not a .gguf file; give a .gguf file or an HF model directory")
    return path


# ---------------------------------------------------------------- HF directories


def _load_hf_dir(directory: Path, dtype) -> Checkpoint:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise JftError(f"{directory}: no config.json; an HF model directory needs one")
    try:
        fields = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise JftError(f"{config_path}: not valid JSON ({error})") from None
    config = config_from_hf(fields, str(config_path))
    files = _safetensors_files(directory)
    name_to_file = {name: f for f in files for name in f.names()}
    rename = _prefix_mapper(name_to_file, directory)
    tied = config.tie_embeddings or rename(TOP_LEVEL["lm_head"].hf) not in name_to_file

    def read(name: str, rows=None) -> np.ndarray:
        actual = rename(name)
        if actual not in name_to_file:
            raise JftError(f"{directory}: tensor {actual!r} is missing from the checkpoint")
        return name_to_file[actual].read(actual, dtype, rows)

    config = config.replace(tie_embeddings=tied)
    params = _build_params(config, dtype, lambda source: source.hf, read)
    return Checkpoint(config, params, _with_chat_template(_dir_tokenizer(directory), config),
                      directory)


def _safetensors_files(directory: Path) -> list[SafetensorsFile]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise JftError(f"{index}: not a valid safetensors index ({error})") from None
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise JftError(f"{index}: lists {missing[0]}, which is not in {directory}")
        return [SafetensorsFile(directory / n) for n in names]
    single = directory / "model.safetensors"
    if single.is_file():
        return [SafetensorsFile(single)]
    shards = sorted(directory.glob("model-*-of-*.safetensors"))
    if shards:
        return [SafetensorsFile(s) for s in shards]
    pickles = [p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES]
    if pickles:
        raise JftError(
            f"{directory}: holds only pickle weights ({pickles[0]}), which jft refuses to load; "
            "convert them to safetensors"
        )
    raise JftError(
        f"{directory}: no model.safetensors, model-*-of-*.safetensors or "
        "model.safetensors.index.json"
    )


def _prefix_mapper(names: dict, directory: Path) -> Callable[[str], str]:
    """Maps HF's `model.` prefix onto the checkpoint's (multimodal wrappers nest it)."""
    embeds = [n for n in names if n.endswith("embed_tokens.weight")]
    if not embeds:
        raise JftError(f"{directory}: no '*embed_tokens.weight' tensor; is this a causal LM?")
    # Prefer the language model's embedding when a vision tower has its own.
    prefix = min(embeds, key=lambda n: ("language_model" not in n, len(n)))
    prefix = prefix[: -len("embed_tokens.weight")]
    head_prefix = "language_model." if prefix.startswith("language_model.") else ""

    def rename(name: str) -> str:
        if name.startswith("model."):
            return prefix + name[len("model."):]
        return head_prefix + name

    return rename


def _dir_tokenizer(directory: Path) -> Tokenizer | None:
    has_files = any(
        (directory / f).is_file() for f in ("tokenizer.json", "tokenizer.model")
    )
    if not has_files:
        return None
    from jft.tokenizer import load_tokenizer_from_dir

    return load_tokenizer_from_dir(directory)


# ---------------------------------------------------------------- GGUF files


def _load_gguf(path: Path, dtype) -> Checkpoint:
    from jft.tokenizer import load_tokenizer_from_gguf

    gguf_file = GGUFFile(path)
    tensors, fields = gguf_file.tensors, gguf_file.metadata
    architecture = fields.get("general.architecture")
    if architecture is None:
        raise JftError(f"{path}: GGUF metadata key 'general.architecture' is missing")
    freq_factors = None
    if "rope_freqs.weight" in tensors:
        freq_factors = tuple(float(f) for f in gguf_file.read("rope_freqs.weight"))
    meta = GGUFMetadata(fields, architecture, str(path), freq_factors)
    if "token_embd.weight" not in tensors:
        raise JftError(f"{path}: tensor 'token_embd.weight' is missing")
    vocab_size = int(tensors["token_embd.weight"].shape[0])
    config = config_from_gguf(meta, vocab_size, tied="output.weight" not in tensors)
    # llama.cpp marks biases only by their tensors being present.
    config = config.replace(
        qkv_bias="blk.0.attn_q.bias" in tensors,
        o_bias="blk.0.attn_output.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors,
    )

    def read(name: str, rows=None) -> np.ndarray:
        if name not in tensors:
            raise JftError(f"{path}: tensor {name!r} is missing")
        if config.norm_plus_one and name.endswith("norm.weight"):
            # llama.cpp stores Gemma's norms as 1 + w
            return gguf_file.read(name, rows=rows) - 1.0
        weights = gguf_file.read(name, dtype, rows)
        if architecture == "llama" and name.endswith(_ROTARY_PERMUTED):
            heads = config.num_heads if "attn_q" in name else config.num_kv_heads
            weights = _unpermute_rotary(weights, heads)
        return weights

    params = _build_params(config, dtype, lambda source: source.gguf, read)
    tokenizer = _with_chat_template(load_tokenizer_from_gguf(fields), config)
    return Checkpoint(config, params, tokenizer, path)


def _with_chat_template(tokenizer: Tokenizer | None, config: ModelConfig) -> Tokenizer | None:
    """Falls back to the family's own chat format when the checkpoint has no template."""
    if tokenizer is not None and not tokenizer.chat_template:
        tokenizer.chat_template = default_chat_templates.BY_FAMILY.get(config.family)
    return tokenizer


_ROTARY_PERMUTED = ("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")


def _unpermute_rotary(weights: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-rotary row order, back to HF's rotate-half order."""
    half = weights.shape[0] // heads // 2
    return (
        weights.reshape(heads, half, 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


# ---------------------------------------------------------------- assembly


# Buffers are filled in place on the device (donated), so the host holds one layer
# (or one chunk of embedding rows) at a time, not a second copy of the model.
@partial(jax.jit, donate_argnums=0)
def _write_layer(stacked, value, index):
    return jax.lax.dynamic_update_index_in_dim(stacked, value, index, axis=0)


@partial(jax.jit, donate_argnums=0)
def _write_rows(buffer, rows, start):
    return jax.lax.dynamic_update_slice_in_dim(buffer, rows, start, axis=0)


_CHUNK_BYTES = 64 << 20


def _build_params(config: ModelConfig, dtype, name_of, read) -> dict[str, Any]:
    """Reads every leaf of `param_shapes(config)` through `read(name_of(source), rows)`."""
    shapes = param_shapes(config)
    sources = layer_sources(config)

    def load(source: TensorSource, name: str, shape) -> np.ndarray:
        raw = read(name)
        try:
            value = source.to_jft(raw, config)
        except ValueError:
            value = None
        if value is None or value.shape != tuple(shape):
            raise JftError(
                f"tensor {name!r} has shape {list(raw.shape)}, which does not fit the "
                f"config (expected {list(shape)} in jft's layout)"
            )
        return value.astype(dtype, copy=False)

    def stream_rows(name: str, shape) -> jax.Array:
        """Top-level tensors keep the checkpoint layout, so they stream by rows."""
        buffer = jnp.zeros(shape, dtype)
        step = max(1, _CHUNK_BYTES // (int(np.prod(shape[1:])) * jnp.dtype(dtype).itemsize))
        for start in range(0, shape[0], step):
            stop = min(start + step, shape[0])
            rows = read(name, (start, stop))
            if rows.shape != (stop - start, *shape[1:]):
                raise JftError(
                    f"tensor {name!r} does not fit the config (expected shape {list(shape)})"
                )
            buffer = _write_rows(buffer, rows.astype(dtype, copy=False), start)
        return buffer

    params: dict[str, Any] = {
        key: stream_rows(name_of(TOP_LEVEL[key]), shape)
        for key, shape in shapes.items()
        if key != "layers"
    }
    layers = {}
    for key, shape in shapes["layers"].items():
        source = sources[key]
        stacked = jnp.zeros(shape, dtype)
        for i in range(config.num_layers):
            value = load(source, name_of(source).format(i=i), shape[1:])
            stacked = _write_layer(stacked, value, i)
        layers[key] = stacked
    params["layers"] = layers
    return params
