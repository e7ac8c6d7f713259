"""jft loads GGUF files laid out the way llama.cpp's converter writes them.

Each tiny HF model is written with tests/gguf_writer.py (llama.cpp's conventions: q/k row
permutation for the `llama` architecture, Gemma norms stored as 1 + w, tied heads left
out, Llama 3 scaling as `rope_freqs.weight`, norms and biases in F32). jft's load must
reproduce the HF model (fp32, 1e-4), agree with transformers' own GGUF loader, and for
quantized files hold exactly the tensors `gguf.quants.dequantize` decodes.
"""

from __future__ import annotations

import dataclasses
import re
from unittest import mock

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from jft.errors import JftError
from jft.formats.loading import load_checkpoint
from jft.models import config_from_hf, forward, param_shapes
from jft.models.tensor_names import TOP_LEVEL, layer_sources
from tests.gguf_writer import K_QUANTS, quantize, unpermute_rotary, write_gguf
from tests.hf_reference import TINY_CONFIGS, VOCAB, hf_logits, make_hf_model

FAMILIES = list(TINY_CONFIGS)

# What a llama.cpp GGUF cannot state is set to what it implies in the models written here.
GGUF_OVERRIDES = {
    "llama": {},
    "llama3": {},
    # llama.cpp's `llama` architecture (used for Mistral) writes no sliding window
    "mistral": dict(sliding_window=None),
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    # llama.cpp writes no query_pre_attn_scalar: below 27B it scales by head_dim
    "gemma2": dict(query_pre_attn_scalar=16),
    "gemma3": dict(query_pre_attn_scalar=16),
}

# Config fields transformers' GGUF reader does not take from the metadata, so they are
# passed to it; None: transformers cannot load that architecture from GGUF at all.
TRANSFORMERS_OVERRIDES = {
    "llama": (),
    # it ignores rope_freqs.weight, and biases are known only from the tensors present
    "llama3": ("rope_parameters", "attention_bias", "mlp_bias"),
    "mistral": (),
    "qwen2": (),
    "qwen3": ("head_dim",),  # it reads no attention.key_length for qwen3
    "gemma": None,  # "GGUF model with architecture gemma is not supported yet"
    "gemma2": ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"),
    "gemma3": ("query_pre_attn_scalar", "rope_parameters"),
}

# Every quantization jft accepts (jft.formats.gguf_file.SUPPORTED_TYPES) other than F32.
QUANT_TYPES = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, *K_QUANTS]

# Rows of 256 and 512 values, so that every weight fills whole K-quant blocks.
WIDE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2)


def tiny_model(family: str, **overrides):
    """`make_hf_model(family)` with some config fields changed."""
    class_name, extra = TINY_CONFIGS[family]
    with mock.patch.dict(TINY_CONFIGS, {family: (class_name, {**extra, **overrides})}):
        return make_hf_model(family)


def tokens(batch=2, length=13, seed=0):
    return np.random.default_rng(seed).integers(3, VOCAB, size=(batch, length))


def jft_logits(checkpoint, ids) -> np.ndarray:
    return np.asarray(forward(checkpoint.config.replace(dtype="float32"), checkpoint.params, ids))


def transformers_gguf_logits(path, hf_model, fields, ids, **extra) -> np.ndarray:
    """Logits of transformers' own load of `path`, `fields` taken from `hf_model.config`."""
    import torch
    import transformers

    overrides = {field: getattr(hf_model.config, field) for field in fields}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32,
        attn_implementation="eager", **overrides, **extra,
    )
    return hf_logits(model.eval(), ids)


def dequantized_params(path, config) -> dict:
    """The file's tensors decoded by gguf, undone from llama.cpp's layout, in jft's layout."""
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    architecture = reader.fields["general.architecture"].contents()

    def read(name: str) -> np.ndarray:
        tensor = tensors[name]
        weights = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
        if config.norm_plus_one and name.endswith("norm.weight"):
            weights = weights - 1.0
        if architecture == "llama" and re.search(r"attn_[qk]\.(weight|bias)$", name):
            heads = config.num_heads if ".attn_q." in name else config.num_kv_heads
            weights = unpermute_rotary(weights, heads)
        return weights

    shapes = param_shapes(config)
    params = {
        key: TOP_LEVEL[key].to_jft(read(TOP_LEVEL[key].gguf), config)
        for key in shapes if key != "layers"
    }
    sources = layer_sources(config)
    params["layers"] = {
        key: np.stack([
            sources[key].to_jft(read(sources[key].gguf.format(i=i)), config)
            for i in range(config.num_layers)
        ])
        for key in shapes["layers"]
    }
    return params


def assert_params_equal(actual: dict, expected: dict):
    assert set(actual) == set(expected)
    for key, value in expected.items():
        if key == "layers":
            assert_params_equal(actual[key], value)
        else:
            np.testing.assert_array_equal(np.asarray(actual[key]), value, err_msg=key)


# ---------------------------------------------------------------- F32, every family


@pytest.fixture(scope="module", params=FAMILIES)
def f32(request, tmp_path_factory):
    family = request.param
    hf_model = tiny_model(family, **GGUF_OVERRIDES[family])
    path = write_gguf(hf_model, tmp_path_factory.mktemp(family) / f"{family}.gguf", family)
    return family, hf_model, path, load_checkpoint(path, dtype="float32")


def test_f32_gguf_logits_match_the_hf_model(f32):
    family, hf_model, _, checkpoint = f32
    ids = tokens()  # longer than the sliding windows of 5
    np.testing.assert_allclose(jft_logits(checkpoint, ids), hf_logits(hf_model, ids),
                               atol=1e-4, rtol=0)


def test_f32_gguf_logits_match_transformers_loading_the_same_file(f32):
    family, hf_model, path, checkpoint = f32
    if TRANSFORMERS_OVERRIDES[family] is None:
        pytest.skip(f"transformers cannot load GGUF architecture of {family}")
    ids = tokens()
    theirs = transformers_gguf_logits(path, hf_model, TRANSFORMERS_OVERRIDES[family], ids)
    np.testing.assert_allclose(jft_logits(checkpoint, ids), theirs, atol=1e-4, rtol=0)


def test_gguf_config_equals_the_config_from_hf_config_json(f32):
    family, hf_model, _, checkpoint = f32
    from_hf = config_from_hf(hf_model.config.to_dict(), "config.json")
    from_gguf = checkpoint.config
    for field in dataclasses.fields(from_hf):
        if field.name in ("rope", "local_rope"):
            continue
        expected = getattr(from_hf, field.name)
        if isinstance(expected, float):  # GGUF stores floats in 32 bits
            expected = pytest.approx(expected, rel=1e-6)
        assert getattr(from_gguf, field.name) == expected, field.name
    # Llama 3 scaling is a rope type in config.json and per-frequency divisors in GGUF.
    for rope in ("rope", "local_rope"):
        hf_rope, gguf_rope = getattr(from_hf, rope), getattr(from_gguf, rope)
        assert (hf_rope is None) == (gguf_rope is None), rope
        if hf_rope is not None:
            np.testing.assert_allclose(gguf_rope.inverse_frequencies(from_hf.head_dim),
                                       hf_rope.inverse_frequencies(from_hf.head_dim),
                                       rtol=1e-6, err_msg=rope)


def test_tied_head_is_absent_from_the_file_and_tied_in_jft(f32):
    family, hf_model, path, checkpoint = f32
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    tied = hf_model.config.tie_word_embeddings
    assert ("output.weight" not in names) == tied
    assert checkpoint.config.tie_embeddings == tied
    assert ("lm_head" in checkpoint.params) == (not tied)


def test_llama3_scaling_is_stored_as_rope_freqs_and_read_back(f32):
    family, _, path, checkpoint = f32
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert ("rope_freqs.weight" in names) == (family == "llama3")
    assert (checkpoint.config.rope.freq_factors is not None) == (family == "llama3")


def test_llama_architecture_biases_load(tmp_path):
    hf_model = tiny_model("llama3")  # attention_bias=True, mlp_bias=True
    path = write_gguf(hf_model, tmp_path / "llama3.gguf", "llama3")
    ids = tokens()
    np.testing.assert_allclose(jft_logits(load_checkpoint(path), ids), hf_logits(hf_model, ids),
                               atol=1e-4, rtol=0)


def test_writer_permutes_llama_biases_as_transformers_expects(tmp_path):
    hf_model = tiny_model("llama3")  # attention_bias=True, mlp_bias=True
    path = write_gguf(hf_model, tmp_path / "llama3.gguf", "llama3")
    ids = tokens()
    theirs = transformers_gguf_logits(
        path, hf_model, ("attention_bias", "mlp_bias", "rope_parameters"), ids)
    np.testing.assert_allclose(theirs, hf_logits(hf_model, ids), atol=1e-4, rtol=0)


def test_gemma3_local_rope_base_is_read_from_freq_base_swa(tmp_path):
    hf_model = tiny_model("gemma3", query_pre_attn_scalar=16)  # rope_local_base_freq=100
    path = write_gguf(hf_model, tmp_path / "gemma3.gguf", "gemma3")
    assert load_checkpoint(path).config.local_rope.theta == 100.0


# ---------------------------------------------------------------- quantized files


@pytest.fixture(scope="module")
def wide_llama():
    return tiny_model("llama", **WIDE)


@pytest.fixture(scope="module", params=QUANT_TYPES, ids=lambda q: q.name)
def quantized(request, wide_llama, tmp_path_factory):
    qtype = request.param
    path = tmp_path_factory.mktemp(qtype.name) / f"llama-{qtype.name}.gguf"
    write_gguf(wide_llama, path, "llama", qtype)
    return qtype, path, load_checkpoint(path, dtype="float32")


def test_quantized_file_stores_weights_in_that_type_and_norms_in_f32(quantized):
    qtype, path, _ = quantized
    for tensor in gguf.GGUFReader(path).tensors:
        expected = Q.F32 if tensor.name.endswith("norm.weight") else qtype
        assert tensor.tensor_type == expected, tensor.name


def test_quantized_params_equal_the_dequantized_tensors(quantized):
    _, path, checkpoint = quantized
    assert_params_equal(checkpoint.params, dequantized_params(path, checkpoint.config))


def test_quantized_logits_match_transformers_loading_the_same_file(quantized, wide_llama):
    _, path, checkpoint = quantized
    ids = tokens()
    np.testing.assert_allclose(jft_logits(checkpoint, ids),
                               transformers_gguf_logits(path, wide_llama, (), ids),
                               atol=1e-4, rtol=0)


def test_mixed_k_quant_gemma3_file_loads_like_transformers(tmp_path):
    # Like llama.cpp's Q4_K_M: Q4_K with Q6_K for attn_v and ffn_down; attn_output's rows
    # (4 heads * 16 = 64 values) do not fill a 256-block, so it falls back to F16.
    hf_model = tiny_model("gemma3", **GGUF_OVERRIDES["gemma3"], **WIDE)
    mixed = {f"blk.{i}.{name}.weight": Q.Q6_K for i in range(2) for name in ("attn_v", "ffn_down")}
    path = write_gguf(hf_model, tmp_path / "gemma3.gguf", "gemma3", Q.Q4_K, tensor_types=mixed)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == Q.Q4_K
    assert types["blk.1.ffn_down.weight"] == Q.Q6_K
    assert types["blk.0.attn_output.weight"] == Q.F16
    checkpoint = load_checkpoint(path, dtype="float32")
    assert_params_equal(checkpoint.params, dequantized_params(path, checkpoint.config))
    ids = tokens()
    theirs = transformers_gguf_logits(path, hf_model, TRANSFORMERS_OVERRIDES["gemma3"], ids)
    np.testing.assert_allclose(jft_logits(checkpoint, ids), theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("qtype", [Q.MXFP4, Q.TQ1_0], ids=lambda q: q.name)
def test_unsupported_quantization_names_the_tensor_and_the_supported_types(
    qtype, wide_llama, tmp_path
):
    path = write_gguf(wide_llama, tmp_path / "llama.gguf", "llama",
                      tensor_types={"blk.1.ffn_up.weight": qtype})
    with pytest.raises(JftError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "blk.1.ffn_up.weight" in message and qtype.name in message
    assert re.search(r"supported: .*F32.*BF16.*Q8_0.*Q4_0.*Q4_1.*Q5_0.*Q4_K.*Q6_K", message)


# ---------------------------------------------------------------- the writer itself


@pytest.mark.parametrize(("qtype", "tolerance"), [
    (Q.Q2_K, 0.4), (Q.Q3_K, 0.25), (Q.Q4_K, 0.1), (Q.Q5_K, 0.05), (Q.Q6_K, 0.03),
], ids=lambda v: getattr(v, "name", str(v)))
def test_k_quant_encoder_round_trips_within_quantization_error(qtype, tolerance):
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((6, 512)) * 0.1 + rng.standard_normal((6, 1)) * 0.05)
    weights = weights.astype(np.float32)
    decoded = gguf.quants.dequantize(quantize(weights, qtype), qtype)
    assert decoded.shape == weights.shape
    relative_rms = np.sqrt(np.mean((decoded - weights) ** 2)) / weights.std()
    assert relative_rms < tolerance


def test_written_vocab_is_a_gpt2_bpe_that_jft_and_transformers_tokenize_alike(tmp_path):
    import transformers

    path = write_gguf(tiny_model("qwen2"), tmp_path / "qwen2.gguf", "qwen2")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    text = "the fox runs over the hills.\n"
    ids = theirs.encode(text, add_special_tokens=False)
    assert theirs.decode(ids) == text
    assert max(ids) < VOCAB and len(ids) < len(text)  # merges were applied
    assert (theirs.bos_token_id, theirs.eos_token_id) == (1, 2)
    ours = load_checkpoint(path).tokenizer
    assert ours.encode(text, add_special_tokens=False) == ids
    assert ours.decode(ids) == text
