"""Writes a tiny HF torch model as a `.gguf` file the way llama.cpp's converter does.

This follows `convert_hf_to_gguf.py` (ggml-org/llama.cpp), so that tests can check jft's
GGUF loader against files laid out like the ones people download:

- tensor names come from gguf's own HF -> GGUF name map (`gguf.get_tensor_name_map`);
- the `llama` architecture (Llama, Llama 3, Mistral) stores q/k rows permuted into the
  interleaved-rotary order, weights and biases alike (`LlamaModel.permute`);
- Gemma 1/2/3 store every `*norm.weight` as `1 + w`;
- a tied head is not written (no `output.weight`);
- Llama 3 rope scaling becomes a `rope_freqs.weight` tensor of per-frequency divisors,
  not metadata; linear scaling becomes `rope.scaling.type`/`rope.scaling.factor`;
- 1-D tensors and `*_norm.weight` stay F32; 2-D weights get `qtype`, falling back to F16
  when a row is not a whole number of blocks (llama.cpp's `QuantError` fallback);
- MoE (`Qwen2MoeModel`, which Qwen3-MoE's converter extends; Mixtral goes out as `llama`
  with the same stacks): transformers 5's fused `mlp.experts.gate_up_proj` [E, 2F, D] is
  split into `ffn_gate_exps` and `ffn_up_exps` [E, F, D] (kept whole as `ffn_gate_up_exps`
  with `fuse_gate_up_exps`, the converter's `--fuse-gate-up-exps`) and `ffn_down_exps` is
  [E, D, F], all three quantized like the 2-D weights; the routers (`ffn_gate_inp`,
  `ffn_gate_inp_shexp`) stay F32. Qwen2-MoE's shared-expert gate [1, D] is written as
  [D], as older converters' `squeeze()` of every tensor left it in the files in
  circulation (`squeeze=False`: as current ones keep it).

Metadata keys follow each family's `set_gguf_parameters`: Gemma 1/2 write no rope base,
Gemma 2 writes its soft-capping and window, Gemma 3 its global and local rope bases, the
MoE families their expert counts and widths.

gguf's Python package has no K-quant encoders, so the Q2_K..Q6_K encoders below are
simple (not llama.cpp's error-minimising search) but produce valid blocks: decoding
them with `gguf.quants.dequantize` gives back the weights within quantization error.

One deliberate difference: llama.cpp reads Llama 3's `original_max_position_embeddings`
from the top level of config.json (default 8192, which is what every released Llama 3.x
has in `rope_scaling`); this writer reads it from the rope parameters, where transformers
keeps it, so tiny test models with a short original context round-trip exactly.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import QuantError

VOCAB = 160

# HF model_type -> GGUF general.architecture
ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "mixtral": "llama",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
}

# Tensors llama.cpp's converter keeps in F32 whatever the quant (the routers).
ALWAYS_F32 = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")

K_QUANTS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)

_FILE_TYPES = {
    Q.F32: gguf.LlamaFileType.ALL_F32,
    Q.F16: gguf.LlamaFileType.MOSTLY_F16,
    Q.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    Q.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
    Q.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
    Q.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K,
    Q.Q3_K: gguf.LlamaFileType.MOSTLY_Q3_K_S,
    Q.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S,
    Q.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_S,
    Q.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K,
}


def write_gguf(
    hf_model,
    path: str | Path,
    family: str,
    qtype: Q = Q.F32,
    tensor_types: dict[str, Q] | None = None,
    fuse_gate_up_exps: bool = False,
    squeeze: bool = True,
) -> Path:
    """Writes `hf_model` (a transformers causal LM) to `path` as llama.cpp would.

    `qtype` is the type of the weights (2-D, and 3-D expert stacks); `tensor_types`
    overrides it per GGUF tensor name (e.g. `{"blk.1.ffn_up.weight": Q.MXFP4}`). `family`
    goes into `general.name` (not as the whole name: transformers takes a `llama` file
    named exactly "mistral" for a Mistral one, then fails to map its tensors). MoE
    experts' gate and up stay one tensor with `fuse_gate_up_exps`; `squeeze` drops
    unit axes (see the module docstring).
    """
    config = hf_model.config
    arch = ARCHITECTURES[config.model_type]
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(f"tiny {family}")
    _write_parameters(writer, config, arch, qtype)
    _write_vocab(writer, config)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tensor_types = tensor_types or {}
    tied = bool(getattr(config, "tie_word_embeddings", False)) or arch in ("gemma", "gemma2")
    for name, tensor in _split_experts(hf_model.state_dict(), fuse_gate_up_exps):
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp writes no output.weight for a tied head
        data = tensor.detach().float().numpy().copy()
        if squeeze:
            data = data.squeeze()
        if arch == "llama" and re.search(r"\.(q|k)_proj\.(weight|bias)$", name):
            heads = config.num_attention_heads
            if ".k_proj." in name:
                heads = config.num_key_value_heads
            data = permute_rotary(data, heads)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            data = data + 1.0
        base, suffix = name.rsplit(".", 1)
        if base.endswith(".mlp.experts.gate_up_proj"):  # not in gguf's HF -> GGUF name map
            layer = int(base.split(".")[2])
            gguf_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_GATE_UP_EXP].format(bid=layer)
        else:
            gguf_name = names.get_name(base)
        if gguf_name is None:
            raise ValueError(f"no GGUF name for {name!r}")
        gguf_name = f"{gguf_name}.{suffix}"
        _add_tensor(writer, gguf_name, data, tensor_types.get(gguf_name, qtype))
    if (factors := llama3_rope_factors(config)) is not None:
        _add_tensor(writer, "rope_freqs.weight", factors, Q.F32)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def _split_experts(state: dict, fuse_gate_up_exps: bool):
    """(name, tensor) with transformers 5's fused expert stacks named as llama.cpp's
    `Qwen2MoeModel.modify_tensors` writes them: `gate_up_proj` [E, 2F, D] split into the
    `gate_proj` and `up_proj` stacks [E, F, D] (gate rows first), `down_proj` [E, D, F]
    whole; with `fuse_gate_up_exps` the gate/up stack stays whole."""
    for name, tensor in state.items():
        if name.endswith(".mlp.experts.gate_up_proj") and not fuse_gate_up_exps:
            gate, up = tensor.chunk(2, dim=1)
            yield name.replace("gate_up_proj", "gate_proj.weight"), gate
            yield name.replace("gate_up_proj", "up_proj.weight"), up
        elif name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")):
            yield f"{name}.weight", tensor
        else:
            yield name, tensor


def permute_rotary(weights: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half row order -> llama.cpp's interleaved order (`LlamaModel.permute`)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def unpermute_rotary(weights: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `permute_rotary` (transformers' `_reverse_permute_weights`)."""
    return (
        weights.reshape(heads, weights.shape[0] // heads // 2, 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def llama3_rope_factors(config) -> np.ndarray | None:
    """Llama 3 scaling as llama.cpp stores it: a divisor per rotary frequency."""
    rope = _rope_parameters(config)
    rope = rope.get("full_attention", rope)
    if str(rope.get("rope_type", rope.get("type", ""))).lower() != "llama3":
        return None
    base = rope.get("rope_theta", 10000.0)
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, np.float32)


# ---------------------------------------------------------------- metadata


def _rope_parameters(config) -> dict:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    return dict(rope or {})


def _write_parameters(writer: gguf.GGUFWriter, config, arch: str, qtype: Q) -> None:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if head_dim is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(_FILE_TYPES.get(qtype, gguf.LlamaFileType.GUESSED))
    # TextModel.set_gguf_parameters writes the expert counts, Qwen2MoeModel (and so
    # Qwen3MoeModel) the routed and shared experts' widths.
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if experts is not None:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    if getattr(config, "moe_intermediate_size", None) is not None:
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if getattr(config, "shared_expert_intermediate_size", None) is not None:
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    if arch in ("gemma", "gemma2"):  # their own set_gguf_parameters: no rope keys at all
        if arch == "gemma2":
            writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
            writer.add_sliding_window(config.sliding_window)
        return
    # TextModel.set_gguf_parameters: rope settings from the (full-attention) rope parameters
    rope = _rope_parameters(config)
    full = rope.get("full_attention", rope)
    kind = full.get("rope_type", full.get("type"))
    if kind == "linear" and full.get("factor") is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(full["factor"])
    elif kind not in (None, "default", "llama3"):  # llama3: rope_freqs.weight instead
        raise ValueError(f"rope type {kind!r} is not written by this test writer")
    default_theta = 1_000_000.0 if arch == "gemma3" else None
    theta = full.get("rope_theta", getattr(config, "rope_theta", None) or default_theta)
    if theta is not None:
        writer.add_rope_freq_base(theta)
    local_theta = rope.get("sliding_attention", {}).get("rope_theta")
    if local_theta is None:
        local_theta = getattr(config, "rope_local_base_freq", None)
    if local_theta is not None:
        writer.add_rope_freq_base_swa(local_theta)
    if arch == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim or config.hidden_size // heads)
    if arch == "gemma3":
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)


# ---------------------------------------------------------------- vocabulary

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: the tiny models' pad/bos/eos

_CORPUS = (
    "the quick brown fox jumps over the lazy dog. then the dog sleeps in the sun, "
    "and the fox runs into the forest where there are other foxes and trees. "
    "in the morning the sun rises over the hills; in the evening it sets again."
)


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def gpt2_vocab(size: int = VOCAB) -> tuple[list[str], list[int], list[str]]:
    """A small byte-level BPE vocabulary: specials, the ASCII bytes, then learned merges.

    Returns (tokens, token types, merges). Bytes outside printable ASCII plus space,
    tab and newline have no token; every merge joins two earlier tokens.
    """
    chars = byte_to_unicode()
    base = [chars[b] for b in [9, 10, *range(32, 127)]]
    tokens = list(SPECIAL_TOKENS) + base
    types = [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS) + [gguf.TokenType.NORMAL] * len(base)
    words = Counter(
        tuple(chars[b] for b in word.encode())
        for word in re.findall(r" ?[a-z]+| ?[^a-z ]+", _CORPUS)
    )
    merges = []
    while len(tokens) < size:
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word[:-1], word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            raise ValueError(f"the corpus allows only {len(tokens)} tokens")
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merged = best[0] + best[1]
        merges.append(f"{best[0]} {best[1]}")
        tokens.append(merged)
        types.append(gguf.TokenType.NORMAL)
        words = Counter({_merge(word, best, merged): count for word, count in words.items()})
    return tokens, [int(t) for t in types], merges


def _merge(word: tuple[str, ...], pair: tuple[str, str], merged: str) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _write_vocab(writer: gguf.GGUFWriter, config) -> None:
    tokens, types, merges = gpt2_vocab(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind, token_id in (("bos", config.bos_token_id), ("eos", config.eos_token_id),
                           ("pad", config.pad_token_id)):
        if isinstance(token_id, list):
            token_id = token_id[0]
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


# ---------------------------------------------------------------- tensors


def _add_tensor(writer: gguf.GGUFWriter, name: str, data: np.ndarray, qtype: Q) -> None:
    if (data.ndim <= 1 or name.endswith(("_norm.weight", *ALWAYS_F32))
            or not name.endswith(".weight")):
        qtype = Q.F32  # llama.cpp keeps 1-D tensors, norms, biases and routers in F32
    try:
        raw = quantize(data, qtype)
    except QuantError:
        qtype = Q.F16  # llama.cpp's fallback when rows do not fill whole blocks
        raw = quantize(data, qtype)
    writer.add_tensor(name, raw, raw_dtype=qtype)


def quantize(data: np.ndarray, qtype: Q) -> np.ndarray:
    """gguf's encoder where it has one, else this file's K-quant encoders."""
    data = np.ascontiguousarray(data, np.float32)
    if qtype not in K_QUANTS:
        return gguf.quants.quantize(data, qtype)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if data.shape[-1] % block:
        raise QuantError(f"row size {data.shape[-1]} is not a multiple of {block} for {qtype.name}")
    blocks = data.reshape(-1, block)
    packed = _K_ENCODERS[qtype](blocks)
    assert packed.dtype == np.uint8 and packed.shape == (blocks.shape[0], type_size)
    return packed.reshape(*data.shape[:-1], data.shape[-1] // block * type_size)


def _f16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fp16 bytes [n, 2], the fp16 value back in fp32 [n, 1])."""
    half = x.astype(np.float16).reshape(-1, 1)
    return half.view(np.uint8), half.astype(np.float32)


def _safe_div(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(y == 0, 0.0, x / np.where(y == 0, 1.0, y))


def _scale_min(x: np.ndarray, levels: int, scale_bits: int):
    """Asymmetric sub-blocks x ~ d*sc*q - dmin*m, with q in [0, levels] and sc, m < 2**bits.

    x: [n, sub, size]. Returns (q uint8, sc, m, d bytes, dmin bytes).
    """
    low = np.minimum(x.min(-1), 0.0)
    scale = (x.max(-1) - low) / levels
    top = 2**scale_bits - 1
    d_bytes, d = _f16(scale.max(-1) / top)
    dmin_bytes, dmin = _f16(-low.min(-1) / top)
    sc = np.clip(np.rint(_safe_div(scale, d)), 0, top).astype(np.uint8)
    m = np.clip(np.rint(_safe_div(-low, dmin)), 0, top).astype(np.uint8)
    step = (d * sc)[..., None]
    offset = (dmin * m)[..., None]
    q = np.clip(np.rint(_safe_div(x + offset, step)), 0, levels).astype(np.uint8)
    return q, sc, m, d_bytes, dmin_bytes


def _symmetric(x: np.ndarray, qmin: int, qmax: int, scale_max: int):
    """Signed sub-blocks x ~ d*sc*q, with q in [qmin, qmax] and |sc| <= scale_max.

    Returns (q int, sc int, d bytes).
    """
    scale = np.abs(x).max(-1) / qmax
    d_bytes, d = _f16(scale.max(-1) / scale_max)
    sc = np.clip(np.rint(_safe_div(scale, d)), -scale_max - 1, scale_max).astype(np.int32)
    q = np.clip(np.rint(_safe_div(x, (d * sc)[..., None])), qmin, qmax).astype(np.int32)
    return q, sc, d_bytes


def _pack_bits(values: np.ndarray, groups: int, width: int, bits: int) -> np.ndarray:
    """values [n, groups * (8 // bits) * width] -> bytes [n, groups * width]; value i of a
    group lands in bits `bits * (i // width)` of byte `i % width` of that group."""
    per_byte = 8 // bits
    v = values.reshape(values.shape[0], groups, per_byte, width).astype(np.uint8)
    out = np.zeros((values.shape[0], groups, width), np.uint8)
    for k in range(per_byte):
        out |= v[:, :, k, :] << np.uint8(bits * k)
    return out.reshape(values.shape[0], groups * width)


def _pack_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes holding eight 6-bit scales and eight 6-bit mins."""
    lo_sc, hi_sc, lo_m, hi_m = sc[:, :4], sc[:, 4:], m[:, :4], m[:, 4:]
    return np.concatenate(
        [lo_sc | ((hi_sc >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_sc & 15) | ((hi_m & 15) << 4)],
        axis=-1,
    ).astype(np.uint8)


def _encode_q2_k(blocks: np.ndarray) -> np.ndarray:
    q, sc, m, d, dmin = _scale_min(blocks.reshape(-1, 16, 16), levels=3, scale_bits=4)
    scales = (sc | (m << 4)).astype(np.uint8)
    qs = _pack_bits(q.reshape(-1, 256), groups=2, width=32, bits=2)
    return np.concatenate([scales, qs, d, dmin], axis=-1)


def _encode_q3_k(blocks: np.ndarray) -> np.ndarray:
    q, sc, d = _symmetric(blocks.reshape(-1, 16, 16), qmin=-4, qmax=3, scale_max=31)
    u = (q + 4).reshape(-1, 256).astype(np.uint8)
    hmask = _pack_bits(u >> 2, groups=1, width=32, bits=1)
    qs = _pack_bits(u & 3, groups=2, width=32, bits=2)
    s = (sc + 32).astype(np.uint8)  # [n, 16], 6 bits each
    low = _pack_bits(s & 15, groups=1, width=8, bits=4)
    high = _pack_bits(s >> 4, groups=1, width=4, bits=2)
    return np.concatenate([hmask, qs, low, high, d], axis=-1)


def _encode_q4_k(blocks: np.ndarray) -> np.ndarray:
    q, sc, m, d, dmin = _scale_min(blocks.reshape(-1, 8, 32), levels=15, scale_bits=6)
    qs = _pack_bits(q.reshape(-1, 256), groups=4, width=32, bits=4)
    return np.concatenate([d, dmin, _pack_k_scales(sc, m), qs], axis=-1)


def _encode_q5_k(blocks: np.ndarray) -> np.ndarray:
    q, sc, m, d, dmin = _scale_min(blocks.reshape(-1, 8, 32), levels=31, scale_bits=6)
    q = q.reshape(-1, 256)
    qh = _pack_bits(q >> 4, groups=1, width=32, bits=1)
    qs = _pack_bits(q & 15, groups=4, width=32, bits=4)
    return np.concatenate([d, dmin, _pack_k_scales(sc, m), qh, qs], axis=-1)


def _encode_q6_k(blocks: np.ndarray) -> np.ndarray:
    q, sc, d = _symmetric(blocks.reshape(-1, 16, 16), qmin=-32, qmax=31, scale_max=127)
    u = (q + 32).reshape(-1, 256).astype(np.uint8)
    ql = _pack_bits(u & 15, groups=2, width=64, bits=4)
    qh = _pack_bits(u >> 4, groups=2, width=32, bits=2)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), d], axis=-1)


_K_ENCODERS = {
    Q.Q2_K: _encode_q2_k,
    Q.Q3_K: _encode_q3_k,
    Q.Q4_K: _encode_q4_k,
    Q.Q5_K: _encode_q5_k,
    Q.Q6_K: _encode_q6_k,
}
