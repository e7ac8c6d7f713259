"""Writing a merged jft model as a `.gguf` file that llama.cpp (and `jft.load`) reads.

The file is laid out the way llama.cpp's `convert_hf_to_gguf.py` writes one: the
`llama` architecture stores q/k rows in interleaved-rotary order, Gemma stores its norms
as 1 + w, a tied head has no `output.weight`, Llama 3 rope scaling becomes a
`rope_freqs.weight` tensor, and 1-D tensors (norms, biases) stay F32 whatever the quant.
The format itself is `gguf.GGUFWriter`'s; tensors are converted and written one at a
time, so host memory holds one layer's tensor beyond the params.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import tokenizers
from gguf import GGMLQuantizationType as Q

from jft.errors import JftError
from jft.formats.loading import ROTARY_PERMUTED, permute_rotary
from jft.models import ModelConfig, config_from_gguf
from jft.models.checkpoint_fields import GGUFMetadata
from jft.models.config import RopeConfig
from jft.models.tensor_names import checkpoint_tensors
from jft.storage import writing
from jft.text.tokenizer import PRE_TOKENIZER_SPLITS, Tokenizer  # the loader's splits by pre name

QUANTS = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")
_FILE_TYPES = {
    Q.F32: gguf.LlamaFileType.ALL_F32,
    Q.F16: gguf.LlamaFileType.MOSTLY_F16,
    Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
}
# Token ids are written from the tokenizer, not from the architecture.
_NOT_ARCHITECTURE = ("policy", "bos_id", "eos_id")


def write_gguf_file(config: ModelConfig, params: dict, tokenizer: Tokenizer | None,
                    path: Path, quant: str = "f16") -> None:
    """Writes `params` (a merged jft params tree) with its tokenizer to `path`.

    quant: "f32", "f16", "q8_0" or "q4_0" for the 2-D weights; a weight whose rows are
    not whole blocks of 32 falls back to F16, as llama.cpp does.
    """
    if quant not in QUANTS:
        raise JftError(f"GGUF quant {quant!r} is not supported; supported: {', '.join(QUANTS)}")
    if config.family not in ARCHITECTURES:
        raise JftError(f"family {config.family!r} cannot be written as GGUF; "
                       f"supported: {', '.join(ARCHITECTURES)}")
    if tokenizer is None:
        raise JftError("this model has no tokenizer, and a GGUF file must carry one; "
                       "load the model with its tokenizer")
    qtype = QUANTS[quant]
    rope, freq_factors = _gguf_rope(config)
    metadata = _architecture_metadata(config, rope)
    _check_expressible(config.replace(rope=rope), metadata, freq_factors)
    path = Path(path)
    tensors = _tensor_layout(config, params, qtype)

    writer = gguf.GGUFWriter(str(path), config.family)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_file_type(_FILE_TYPES[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in metadata.items():
        writer.add_key_value(key, value, _value_type(value))
    _write_tokenizer(writer, tokenizer, config)
    for name, byte_shape, qtype_of, _ in tensors:
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8),
                               math.prod(byte_shape), raw_dtype=qtype_of)
    # The file is opened here: a failure leaves a partial one to remove. (Free space is the
    # caller's to check, with `gguf_bytes`: python -m jft.export does.)
    with writing(path):
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for _, _, qtype_of, values in tensors:
                data = np.ascontiguousarray(values(), np.float32)
                writer.write_tensor_data(
                    gguf.quants.quantize(data, qtype_of).view(np.uint8).view(_Written))
        except BaseException:
            with contextlib.suppress(OSError):  # flushing what is buffered fails the same way
                writer.close()
            raise
        writer.close()


class _Written(np.ndarray):
    """Tensor bytes that `GGUFWriter` writes through its Python file object: numpy's own
    `tofile` reports a full disk as a short write without its errno."""

    def tofile(self, file, *args, **kwargs):
        file.write(memoryview(np.ascontiguousarray(self)).cast("B"))


def gguf_bytes(config: ModelConfig, params: dict, tokenizer: Tokenizer | None,
               quant: str = "f16") -> int:
    """About the size of `write_gguf_file`'s file: the tensor data, plus the tokenizer's JSON
    length for the vocabulary and merges the file carries as metadata."""
    layout = _tensor_layout(config, params, QUANTS[quant])
    backend = tokenizer.hf_tokenizer if tokenizer is not None else None
    vocabulary = len(backend.to_str()) if isinstance(backend, tokenizers.Tokenizer) else 0
    return sum(math.prod(byte_shape) for _, byte_shape, _, _ in layout) + vocabulary


def _tensor_layout(config: ModelConfig, params: dict, qtype: Q
                   ) -> list[tuple[str, tuple[int, ...], Q, Any]]:
    """(GGUF name, shape in bytes, type, a function giving its float values) per tensor."""
    _, freq_factors = _gguf_rope(config)
    layout = []
    for name, shape, values in _tensor_specs(config, params, freq_factors):
        tensor_type = _tensor_type(name, shape, qtype)
        layout.append((name, gguf.quant_shape_to_byte_shape(shape, tensor_type), tensor_type,
                       values))
    return layout


# ---------------------------------------------------------------- metadata


def _gguf_rope(config: ModelConfig) -> tuple[RopeConfig, np.ndarray | None]:
    """The rope as GGUF holds it: Llama 3 scaling becomes per-frequency divisors."""
    rope = config.rope
    if rope.kind != "llama3" and rope.freq_factors is None:
        return rope, None
    if config.family != "llama":
        raise JftError(f"{config.family}: per-frequency rope scaling (Llama 3 style) is only "
                       "written for the llama architecture")
    unscaled = RopeConfig(theta=rope.theta).inverse_frequencies(config.head_dim)
    factors = (unscaled / rope.inverse_frequencies(config.head_dim)).astype(np.float32)
    return RopeConfig(theta=rope.theta, freq_factors=tuple(float(f) for f in factors)), factors


def _architecture_metadata(config: ModelConfig, rope: RopeConfig) -> dict[str, Any]:
    """`{arch}.*` keys as llama.cpp's converter writes them for this family."""
    c = config
    fields: dict[str, Any] = {
        "context_length": c.max_position,
        "embedding_length": c.embed_dim,
        "block_count": c.num_layers,
        "feed_forward_length": c.mlp_dim,
        "attention.head_count": c.num_heads,
        "attention.head_count_kv": c.num_kv_heads,
        "attention.key_length": c.head_dim,
        "attention.value_length": c.head_dim,
        "attention.layer_norm_rms_epsilon": c.norm_eps,
        "rope.freq_base": rope.theta,
    }
    if rope.kind == "linear":
        fields["rope.scaling.type"] = "linear"
        fields["rope.scaling.factor"] = rope.factor
    if c.family == "llama":
        fields["vocab_size"] = c.vocab_size
        fields["rope.dimension_count"] = c.head_dim
    if c.sliding_window is not None and "sliding" in c.layer_types:
        fields["attention.sliding_window"] = c.sliding_window
    if c.local_rope is not None:
        fields["rope.freq_base_swa"] = c.local_rope.theta
    if c.attn_softcap is not None:
        fields["attn_logit_softcapping"] = c.attn_softcap
    if c.final_softcap is not None:
        fields["final_logit_softcapping"] = c.final_softcap
    return {f"{c.family}.{key}": value for key, value in fields.items()}


def _value_type(value: Any) -> gguf.GGUFValueType:
    if isinstance(value, str):
        return gguf.GGUFValueType.STRING
    if isinstance(value, int):
        return gguf.GGUFValueType.UINT32
    return gguf.GGUFValueType.FLOAT32


def _check_expressible(config: ModelConfig, metadata: dict[str, Any],
                       freq_factors: np.ndarray | None) -> None:
    """Reads the metadata back as the loader will, so that a model GGUF cannot describe
    (a query scale or layer pattern llama.cpp derives differently) fails here, not later."""
    as_read = {key: float(np.float32(v)) if isinstance(v, float) else v
               for key, v in metadata.items()}
    factors = None if freq_factors is None else tuple(float(f) for f in freq_factors)
    meta = GGUFMetadata(as_read, config.family, "GGUF export", factors)
    read = config_from_gguf(meta, config.vocab_size, config.tie_embeddings)
    read = read.replace(qkv_bias=config.qkv_bias, o_bias=config.o_bias,
                        mlp_bias=config.mlp_bias)
    differing = [field.name for field in dataclasses.fields(ModelConfig)
                 if field.name not in _NOT_ARCHITECTURE
                 and not _same(getattr(config, field.name), getattr(read, field.name))]
    if differing:
        raise JftError(f"this {config.family} model's {', '.join(differing)} cannot be "
                       "expressed in GGUF metadata (llama.cpp derives them from the family)")


def _same(a: Any, b: Any) -> bool:
    """Equal, floats to float32 precision (GGUF stores float32)."""
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
        return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


# ---------------------------------------------------------------- tensors


def _tensor_specs(config: ModelConfig, params: dict, freq_factors: np.ndarray | None
                  ) -> Iterator[tuple[str, tuple[int, ...], Any]]:
    """(GGUF name, shape, a function giving its values as llama.cpp stores them)."""

    def stored(name: str, values: np.ndarray) -> np.ndarray:
        if config.family == "llama" and name.endswith(ROTARY_PERMUTED):
            values = permute_rotary(values, config.head_dim)
        if config.norm_plus_one and name.endswith("norm.weight"):
            values = values + 1.0
        return values

    for name, shape, read in checkpoint_tensors(params, config, lambda source: source.gguf):
        yield name, shape, lambda name=name, read=read: stored(name, read())
    if freq_factors is not None:
        yield "rope_freqs.weight", freq_factors.shape, lambda: freq_factors


def _tensor_type(name: str, shape: tuple[int, ...], qtype: Q) -> Q:
    """llama.cpp's choice: norms, biases and other 1-D tensors in F32; Q8_0 only for rows
    of whole 32-value blocks, else F16."""
    if len(shape) < 2 or not name.endswith(".weight"):
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else Q.F16


# ---------------------------------------------------------------- tokenizer


def _write_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer, config: ModelConfig) -> None:
    backend = tokenizer.hf_tokenizer
    if not isinstance(backend, tokenizers.Tokenizer):
        raise JftError("only a tokenizer.json (or GGUF) tokenizer can be written to GGUF, "
                       "not a SentencePiece tokenizer.model one")
    spec = json.loads(backend.to_str())
    byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
    if spec["model"]["type"] != "BPE" or not (byte_level or config.norm_plus_one):
        raise JftError("GGUF export supports byte-level BPE tokenizers (Llama 3, SmolLM, "
                       "Qwen) and Gemma's; this tokenizer is neither")
    tokens, types = _vocabulary(backend, tokenizer, config.vocab_size, byte_level)
    if byte_level:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m)
                                 for m in spec["model"]["merges"]])
    else:  # Gemma: sentencepiece, whose merges llama.cpp takes from the scores' order
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_scores([-float(i) for i in range(len(tokens))])
        writer.add_add_space_prefix(False)  # llama.cpp's default would prepend one
    special = tokenizer.special_tokens
    for name, adder in (("bos_token", writer.add_bos_token_id),
                        ("eos_token", writer.add_eos_token_id),
                        ("unk_token", writer.add_unk_token_id),
                        ("pad_token", writer.add_pad_token_id)):
        if name in special and (token_id := backend.token_to_id(special[name])) is not None:
            adder(token_id)
    writer.add_add_bos_token(tokenizer.add_bos)
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _vocabulary(backend: tokenizers.Tokenizer, tokenizer: Tokenizer, vocab_size: int,
                byte_level: bool) -> tuple[list[str], list[int]]:
    """Tokens by id and llama.cpp token types, padded to the embedding's rows with
    unused `[PADi]` tokens as llama.cpp's converter does."""
    vocab = backend.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise JftError(f"the tokenizer has ids up to {max(vocab.values())}, beyond the "
                       f"model's {vocab_size}-row embedding")
    added = backend.get_added_tokens_decoder()
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for token, index in vocab.items():
        # Gemma's files spell its runs of spaces with spaces, not "▁" (the loader maps back).
        spaces = not byte_level and len(token) >= 2 and set(token) == {"▁"}
        tokens[index] = " " * len(token) if spaces else token
        if index in added:
            kind = gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED
        elif not byte_level and token.startswith("<0x") and len(token) == 6:
            kind = gguf.TokenType.BYTE
        elif token == tokenizer.special_tokens.get("unk_token"):
            kind = gguf.TokenType.UNKNOWN
        else:
            kind = gguf.TokenType.NORMAL
        types[index] = int(kind)
    return tokens, types


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level tokenizer's word split."""
    pre = pre or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[1].get("use_regex", True):
        return "smollm"  # GPT-2's split with digits apart (SmolLM)
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex")
        for name, split in PRE_TOKENIZER_SPLITS.items():
            if split == pattern:
                return name
    raise JftError(f"this tokenizer's word split ({', '.join(map(str, kinds))}) has no "
                   "llama.cpp tokenizer.ggml.pre name; supported: GPT-2, SmolLM, Llama 3, "
                   "Qwen 2 splits")
