"""Loading a model from an HF directory, a `.gguf` file or a bundled name.

Params are built leaf by leaf: each checkpoint tensor is read, laid out, cast to the
target dtype and written into its slot of a layer-stacked device buffer that is
donated back each time, so host memory holds one tensor beyond the model itself.

Given a sharding per leaf, each process builds only the shards its own devices hold:
it reads the checkpoint rows those shards need (once for devices holding the same
shard), fills one buffer per device layer by layer and assembles the global arrays, so
a model larger than one host or one device loads.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jft.errors import JftError
from jft.formats.bundled import BUNDLED, bundled_path
from jft.formats.gguf_file import GGUFFile
from jft.formats.safetensors_io import SafetensorsFile
from jft.models import ModelConfig, config_from_gguf, config_from_hf, param_shapes
from jft.models.checkpoint_fields import GGUFMetadata
from jft.models.sites import linear_sites
from jft.models.tensor_names import (
    TOP_LEVEL,
    ExpertStackSource,
    Layout,
    Ranges,
    TensorSource,
    expert_sources,
    layer_sources,
)
from jft.quant import FORMATS, QuantizedTensor
from jft.quant.params import QuantizeSpec, error_of, weight_to_matrix
from jft.text import default_chat_templates

if TYPE_CHECKING:
    from jft.text.tokenizer import Tokenizer

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# (leaf path in the params tree, its global shape) -> where the leaf lives
ShardingFn = Callable[[tuple[str, ...], tuple[int, ...]], jax.sharding.Sharding]


@dataclass
class Checkpoint:
    config: ModelConfig
    params: dict[str, Any]
    tokenizer: Tokenizer | None
    source: Path
    quantization: QuantizationReport | None = None
    loftq_delta: dict | None = None  # LoRA's delta of `init: loftq`, made as it quantized


@dataclass
class QuantizationReport:
    """What quantizing a checkpoint did: tensors kept in the file's own format, and
    tensors converted, by source type, with the relative RMS error of each conversion
    against the values the file holds."""

    format: str
    kept: dict[str, int]
    errors: dict[str, list[float]]

    def summary(self) -> str:
        parts = [f"kept {count} {kind} tensors as stored" for kind, count in self.kept.items()]
        for kind, errors in self.errors.items():
            parts.append(f"quantized {len(errors)} {kind} tensors to {self.format} (relative "
                         f"RMS error {np.mean(errors):.4f} mean, {max(errors):.4f} max)")
        return "; ".join(parts)


def load_checkpoint(model: str | Path, dtype: str = "float32",
                    sharding: ShardingFn | None = None,
                    quantize: QuantizeSpec | None = None, loftq=None) -> Checkpoint:
    """Loads a bundled name, an HF directory or a `.gguf` file with params in `dtype`.

    `sharding(path, shape)` places each leaf, e.g. `("layers", "q_proj")` of its global
    shape, or `("layers", "q_proj", "codes")` of a quantized one; each process then reads
    only what its addressable devices hold. None: every leaf on the default device.
    `quantize`: the linear weights (and with `embeddings` the tables) are quantized a
    layer at a time as they are read (`jft.quant`), a GGUF file's Q8_0 and Q4_0 tensors
    kept as stored. `loftq`: a LoraConfig with `init: loftq`, whose targets are quantized
    by LoftQ from their float weights (`jft.quant.loftq`); its delta is `loftq_delta`.
    """
    path = resolve(model)
    if loftq is not None and quantize is None:
        from jft.peft.lora_inits import LOFTQ_NEEDS_QUANTIZED

        raise JftError(LOFTQ_NEEDS_QUANTIZED)
    building = _Building(quantize, loftq)
    if path.suffix == ".gguf":
        checkpoint = _load_gguf(path, jnp.dtype(dtype), sharding, building)
    else:
        checkpoint = _load_hf_dir(path, jnp.dtype(dtype), sharding, building)
    if loftq is not None:
        from jft.peft.lora_inits import loftq_delta

        checkpoint.loftq_delta = loftq_delta(checkpoint.params, checkpoint.config, loftq,
                                             building.factors)
    return checkpoint


@dataclass
class _Building:
    """How the params are built: quantized (`quantize`), LoftQ's targets (`loftq`), and
    what that produced beside the params (the report, LoftQ's factors per module)."""

    quantize: QuantizeSpec | None
    loftq: Any = None
    report: QuantizationReport | None = None
    factors: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.quantize is not None:
            self.report = QuantizationReport(self.quantize.format, {}, {})


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


def _load_hf_dir(directory: Path, dtype, sharding: ShardingFn | None,
                 building: _Building) -> Checkpoint:
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

    def file_of(name: str) -> SafetensorsFile:
        if rename(name) not in name_to_file:
            raise JftError(f"{directory}: tensor {rename(name)!r} is missing from the checkpoint")
        return name_to_file[rename(name)]

    reader = _Reader(
        name_of=lambda source: source.hf,
        shape=lambda name: file_of(name).tensors[rename(name)].shape,
        read=lambda name, rows, columns: file_of(name).read(rename(name), dtype, rows, columns),
        describe=lambda name: f"{file_of(name).path}: tensor {rename(name)!r}",
        kind=lambda name: str(file_of(name).tensors[rename(name)].dtype),
        has=lambda name: rename(name) in name_to_file,
    )
    config = config.replace(tie_embeddings=tied)
    params = _build_params(config, dtype, reader, sharding, building)
    return Checkpoint(config, params, _with_chat_template(_dir_tokenizer(directory), config),
                      directory, building.report)


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
    from jft.text.tokenizer import load_tokenizer_from_dir

    return load_tokenizer_from_dir(directory)


# ---------------------------------------------------------------- GGUF files


def _load_gguf(path: Path, dtype, sharding: ShardingFn | None,
               building: _Building) -> Checkpoint:
    from jft.text.tokenizer import load_tokenizer_from_gguf

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
    if config.moe is None and meta.get("expert_count"):
        # llama.cpp writes Mixtral as `llama` with expert stacks in place of the MLP.
        raise JftError(f"{path}: this {architecture!r} file is a mixture-of-experts model "
                       f"({meta.get('expert_count')} experts per layer, as llama.cpp writes "
                       "Mixtral), which jft does not read from GGUF; load its HF checkpoint")
    # llama.cpp marks biases only by their tensors being present.
    config = config.replace(
        qkv_bias="blk.0.attn_q.bias" in tensors,
        o_bias="blk.0.attn_output.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors,
    )

    def squeezed(name: str) -> bool:
        # llama.cpp's converter squeezed Qwen2-MoE's shared-expert gate [1, D] to [D], the
        # shape its loader asks for; newer converters keep [1, D]. Both read as [1, D].
        return name.endswith(SQUEEZED_ROW) and len(tensors[name].shape) == 1

    def shape(name: str) -> tuple[int, ...]:
        if name not in tensors:
            raise JftError(f"{path}: tensor {name!r} is missing")
        return (1, *tensors[name].shape) if squeezed(name) else tensors[name].shape

    def read(name: str, rows, columns) -> np.ndarray:
        if squeezed(name):  # its one row, the columns asked for
            return gguf_file.read(name, dtype, columns)[None]
        if config.norm_plus_one and name.endswith("norm.weight"):
            # llama.cpp stores Gemma's norms as 1 + w
            return gguf_file.read(name, rows=rows, columns=columns) - 1.0
        weights = gguf_file.read(name, dtype, rows, columns)
        if architecture == "llama" and name.endswith(ROTARY_PERMUTED):
            weights = unpermute_rotary(weights, config.head_dim)  # rows are whole heads
        return weights

    def read_stored(name: str) -> QuantizedTensor | None:
        """A Q8_0 / Q4_0 tensor as the file stores it, [rows, columns]."""
        kind = tensors[name].kind.name.lower()
        if kind not in FORMATS:
            return None
        raw = gguf_file.read_raw(name)
        if architecture == "llama" and name.endswith(ROTARY_PERMUTED):
            raw = unpermute_rotary(raw, config.head_dim)  # whole rows move
        codes, scales = FORMATS[kind].split(raw)
        return QuantizedTensor(codes, scales, None, None, kind, 32, tensors[name].shape[-1])

    reader = _Reader(name_of=lambda source: source.gguf, shape=shape, read=read,
                     describe=lambda name: f"{path}: tensor {name!r}",
                     kind=lambda name: tensors[name].kind.name, read_stored=read_stored,
                     has=lambda name: name in tensors)
    params = _build_params(config, dtype, reader, sharding, building)
    tokenizer = _with_chat_template(load_tokenizer_from_gguf(fields, path), config)
    return Checkpoint(config, params, tokenizer, path, building.report)


def _with_chat_template(tokenizer: Tokenizer | None, config: ModelConfig) -> Tokenizer | None:
    """Falls back to the family's own chat format when the checkpoint has no template."""
    if tokenizer is not None and not tokenizer.chat_template:
        tokenizer.chat_template = default_chat_templates.BY_FAMILY.get(config.family)
        tokenizer.chat_template_source = f"jft's default {config.family} chat template"
    return tokenizer


ROTARY_PERMUTED = ("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")
SQUEEZED_ROW = "ffn_gate_inp_shexp.weight"


def unpermute_rotary(weights: np.ndarray, head_dim: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-rotary row order, back to HF's rotate-half order."""
    return (
        weights.reshape(-1, head_dim // 2, 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def permute_rotary(weights: np.ndarray, head_dim: int) -> np.ndarray:
    """HF's rotate-half row order -> llama.cpp's interleaved order (for GGUF export)."""
    return (
        weights.reshape(-1, 2, head_dim // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


# ---------------------------------------------------------------- assembly


@dataclass(frozen=True)
class _Reader:
    """A checkpoint's tensors: the name of a `TensorSource` in this format, a tensor's
    shape, and `read(name, rows, columns)` of a block (in the load dtype or float32)."""

    name_of: Callable[[TensorSource], str]  # of an ExpertStackSource: its ExpertTensors
    shape: Callable[[str], tuple[int, ...]]
    read: Callable[[str, tuple[int, int], tuple[int, int] | None], np.ndarray]
    describe: Callable[[str], str]  # "file: tensor 'name'", for errors
    kind: Callable[[str], str]  # its stored type: "float16", "Q4_K", ...
    # A tensor kept in its stored quantized form [rows, columns], or None (GGUF's Q8_0, Q4_0)
    read_stored: Callable[[str], QuantizedTensor | None] = lambda name: None
    has: Callable[[str], bool] = lambda name: True  # whether the checkpoint stores it


# Buffers are filled in place on the device (donated), so the host holds one layer
# (or one chunk of embedding rows) at a time, not a second copy of the model.
@partial(jax.jit, donate_argnums=0)
def _write_layer(stacked, value, index):
    return jax.lax.dynamic_update_index_in_dim(stacked, value, index, axis=0)


@partial(jax.jit, donate_argnums=0)
def _write_rows(buffer, rows, start):
    return jax.lax.dynamic_update_slice_in_dim(buffer, rows, start, axis=0)


_CHUNK_BYTES = 64 << 20


class _Shards:
    """One leaf being filled: a buffer on each device that holds part of it. Devices
    holding the same part (ranges per axis) share its reads."""

    def __init__(self, shape, dtype, sharding: jax.sharding.Sharding | None):
        self.shape, self.dtype, self.sharding = tuple(shape), dtype, sharding
        if sharding is None:  # all of it on the default device
            ranges_of = {None: tuple((0, size) for size in self.shape)}
        else:
            ranges_of = {
                device: tuple(cut.indices(size)[:2] for cut, size in zip(index, shape, strict=True))
                for device, index in sharding.addressable_devices_indices_map(self.shape).items()
            }
        self.buffers = {
            device: jnp.zeros([stop - start for start, stop in ranges], dtype, device=device)
            for device, ranges in ranges_of.items()
        }
        self.devices_of = defaultdict(list)
        for device, ranges in ranges_of.items():
            self.devices_of[ranges].append(device)

    def parts(self) -> list[Ranges]:
        return list(self.devices_of)

    def write(self, update, part: Ranges, value: np.ndarray, offset: int):
        value = value.astype(self.dtype, copy=False)
        for device in self.devices_of[part]:
            self.buffers[device] = update(self.buffers[device], value, offset)
        # Dispatch is asynchronous: without waiting, the host copies of every layer read
        # so far could pile up in the transfer queue, and host memory with them.
        jax.block_until_ready([self.buffers[device] for device in self.devices_of[part]])

    def array(self) -> jax.Array:
        if self.sharding is None:
            return self.buffers[None]
        return jax.make_array_from_single_device_arrays(
            self.shape, self.sharding, list(self.buffers.values()))


def _build_params(config: ModelConfig, dtype, reader: _Reader, sharding: ShardingFn | None,
                  building: _Building | None = None) -> dict[str, Any]:
    """Every leaf of `param_shapes(config)`, placed by `sharding` (None: default device)."""
    shapes = param_shapes(config)
    sources = layer_sources(config)
    experts = expert_sources(config) if config.moe is not None else {}
    sites = {site.name: site for site in linear_sites(config)}
    building = building or _Building(None)
    quantize, report = building.quantize, building.report
    if quantize is not None and config.moe is not None:
        raise JftError(f"quantize: {quantize.format} does not cover mixture-of-experts models "
                       f"({config.family}) yet: their expert stacks are most of the weights "
                       "and would stay in float; use quantize: none")
    if building.loftq is not None:
        from jft.peft.lora import plan

        loftq_plans = plan(config, building.loftq)

    def shards(path: tuple[str, ...], shape) -> _Shards:
        return _Shards(shape, dtype, sharding(path, tuple(shape)) if sharding else None)

    params: dict[str, Any] = {}
    for key, shape in shapes.items():
        if key == "layers":
            continue
        if quantize is not None and quantize.quantizes((key,), sites):
            name = reader.name_of(TOP_LEVEL[key])
            _check_shape(reader, name, TOP_LEVEL[key].layout.checkpoint_shape(shape))
            matrix = _quantized_matrix(reader, name, None, quantize, report)
            params[key] = _place_quantized([matrix], (key,), sharding, stacked=False)
            continue
        leaf = shards((key,), shape)
        _fill_rows(reader, TOP_LEVEL[key], leaf, config)
        params[key] = leaf.array()
    params["layers"] = {}
    for key, shape in shapes["layers"].items():
        if quantize is not None and quantize.quantizes(("layers", key), sites):
            names = [reader.name_of(sources[key]).format(i=i) for i in range(config.num_layers)]
            for name in names:
                _check_shape(reader, name, sources[key].layout.checkpoint_shape(shape[1:]))
            site_layout = (sources[key].layout, sites[key], config)
            if building.loftq is not None and key in loftq_plans:
                layers = _loftq_layers(reader, names, site_layout, building, loftq_plans[key])
                params["layers"][key] = _place_quantized(layers, ("layers", key), sharding)
                continue
            # Layers stack into one array: a site's stored formats are kept only if they
            # are all the same (a Q4_K_M file mixes Q4_K and Q6_K layers).
            keep = len({reader.kind(name) for name in names}) == 1
            layers = [_quantized_matrix(reader, name, site_layout, quantize, report, keep)
                      for name in names]
            params["layers"][key] = _place_quantized(layers, ("layers", key), sharding)
            continue
        leaf = shards(("layers", key), shape)
        if key in experts:
            _fill_expert_layers(reader, experts[key], leaf, config)
        else:
            _fill_layers(reader, sources[key], leaf, config)
        params["layers"][key] = leaf.array()
    return params


def _check_shape(reader: _Reader, name: str, expected: tuple[int, ...]) -> None:
    if tuple(reader.shape(name)) != tuple(expected):
        raise JftError(f"{reader.describe(name)} has shape {list(reader.shape(name))}, which "
                       f"does not fit the config (expected {list(expected)})")


def _quantized_matrix(reader: _Reader, name: str, site_layout, quantize: QuantizeSpec,
                      report: QuantizationReport, keep: bool = True) -> QuantizedTensor:
    """One tensor quantized as the matrix [*out, in] (a table: [rows, D]): kept as
    stored if its format is one jft computes with (and `keep`), else read in float and
    quantized."""
    stored = reader.read_stored(name) if keep else None
    kind = reader.kind(name)
    out_dims = () if site_layout is None else site_layout[1].dims(site_layout[2])[1]
    if stored is not None:
        report.kept[kind] = report.kept.get(kind, 0) + 1
        return _split_rows(stored, out_dims)
    values = reader.read(name, (0, reader.shape(name)[0]), None)
    if site_layout is not None:
        layout, site, config = site_layout
        values = weight_to_matrix(site, layout.to_jft(values, config))
    tensor = quantize.quantize(values)
    report.errors.setdefault(kind, []).append(error_of(values, tensor))
    return tensor


def _loftq_layers(reader: _Reader, names: list[str], site_layout, building: _Building,
                  module_plan) -> list[QuantizedTensor]:
    """A LoftQ target's layers, each quantized with its LoRA factors from its float
    values (a GGUF file's own, when it stores them quantized); the factors are kept in
    `building.factors` for the delta."""
    from jft.peft.lora_inits import options
    from jft.quant.loftq import loftq

    layout, site, config = site_layout
    iterations = int(options(building.loftq)["loftq_iter"])
    layers, factors_a, factors_b = [], [], []
    for i, name in enumerate(names):
        values = weight_to_matrix(site, layout.to_jft(
            reader.read(name, (0, reader.shape(name)[0]), None), config))
        result = loftq(values, building.quantize, module_plan.ranks[i], module_plan.scales[i],
                       iterations, lead=0, width=module_plan.max_rank)
        building.report.errors.setdefault(reader.kind(name), []).append(
            error_of(values, result.quantized))
        layers.append(result.quantized)
        factors_a.append(result.a)
        factors_b.append(result.b)
    building.factors[site.name] = (np.stack(factors_a), np.stack(factors_b))
    return layers


def _split_rows(tensor: QuantizedTensor, out_dims: tuple[int, ...]) -> QuantizedTensor:
    """A stored [rows, columns] tensor with its rows split into a site's output dims."""
    if len(out_dims) < 2:
        return tensor
    return QuantizedTensor(tensor.codes.reshape(*out_dims, -1),
                           tensor.scales.reshape(*out_dims, -1), None, None, tensor.format,
                           tensor.block, tensor.columns)


def _place_quantized(layers: list[QuantizedTensor], path: tuple[str, ...],
                     sharding: ShardingFn | None, stacked: bool = True) -> QuantizedTensor:
    """Quantized layers (host arrays) stacked over a leading layers axis (`stacked`) or a
    single tensor, each array placed as `sharding` says for it."""
    first = layers[0]
    arrays = {}
    for field in ("codes", "scales", "scale_absmax", "scale_offset"):
        if getattr(first, field) is None:
            arrays[field] = None
            continue
        values = [np.asarray(getattr(layer, field)) for layer in layers]
        value = np.stack(values) if stacked else values[0]
        if sharding is None:
            arrays[field] = jnp.asarray(value)
        else:  # every process holds the whole value and hands its devices their slices
            arrays[field] = jax.make_array_from_callback(
                value.shape, sharding((*path, field), value.shape), value.__getitem__)
    return QuantizedTensor(**arrays, format=first.format, block=first.block,
                           columns=first.columns)


def _fill_layers(reader: _Reader, source: TensorSource, leaf: _Shards, config: ModelConfig):
    """Streams a stacked leaf one layer at a time into the parts holding that layer."""
    for i in range(config.num_layers):
        holding = [part for part in leaf.parts() if part[0][0] <= i < part[0][1]]
        values = _read_parts(reader, reader.name_of(source).format(i=i), source.layout,
                             leaf.shape[1:], [part[1:] for part in holding], config)
        for part in holding:
            leaf.write(_write_layer, part, values[part[1:]], i - part[0][0])


def _fill_expert_layers(reader: _Reader, source: ExpertStackSource, leaf: _Shards,
                        config: ModelConfig):
    """An expert stack, one layer's experts read whole at a time (fused, stacked per
    projection or per expert), each tensor's shape checked as it is read."""

    def read(name, shape):
        _check_shape(reader, name, shape)
        return reader.read(name, (0, shape[0]), None)

    for i in range(config.num_layers):
        holding = [part for part in leaf.parts() if part[0][0] <= i < part[0][1]]
        if not holding:
            continue
        value = source.read_layer(reader.name_of(source), reader.has, read, config, i)
        for part in holding:
            block = value[tuple(slice(*r) for r in part[1:])]
            leaf.write(_write_layer, part, block, i - part[0][0])


def _fill_rows(reader: _Reader, source: TensorSource, leaf: _Shards, config: ModelConfig):
    """Top-level tensors keep the checkpoint layout, so they stream by row chunks."""
    row_bytes = int(np.prod(leaf.shape[1:])) * jnp.dtype(leaf.dtype).itemsize
    step = max(1, _CHUNK_BYTES // row_bytes)
    by_rows = defaultdict(list)  # one read serves the parts of the same rows
    for part in leaf.parts():
        by_rows[part[0]].append(part)
    for (start, stop), same_rows in by_rows.items():
        for first in range(start, stop, step):
            chunk = (first, min(first + step, stop))
            values = _read_parts(reader, reader.name_of(source), source.layout, leaf.shape,
                                 [(chunk, *part[1:]) for part in same_rows], config)
            for part in same_rows:
                leaf.write(_write_rows, part, values[(chunk, *part[1:])], first - start)


def _read_parts(reader: _Reader, name: str, layout: Layout, shape, parts: list[Ranges],
                config: ModelConfig) -> dict[Ranges, np.ndarray]:
    """jft[part] for each part of the leaf of `shape` held in tensor `name`, reading each
    range of checkpoint rows once for all the parts that lie in it."""
    if parts:
        _check_shape(reader, name, layout.checkpoint_shape(tuple(shape)))
    by_rows = defaultdict(list)
    for part in parts:
        rows, *columns = layout.checkpoint_ranges(part, config)  # a 1-D tensor has no columns
        by_rows[rows].append((part, columns[0] if columns else None))
    values = {}
    for rows, in_rows in by_rows.items():
        wanted = [columns for _, columns in in_rows if columns is not None]
        # Of the rows read, only the columns some part needs are kept.
        span = (min(c[0] for c in wanted), max(c[1] for c in wanted)) if wanted else None
        block = reader.read(name, rows, span)
        for part, columns in in_rows:
            if span is not None:
                part_block = block[:, columns[0] - span[0]:columns[1] - span[0]]
            else:
                part_block = block
            values[part] = layout.to_jft(part_block, config, part)
    return values
