"""jft writes merged models as GGUF files that its own GGUF loader reads back unchanged.

The tiny models come from GGUF files laid out as llama.cpp's converter writes them
(tests/gguf_writer.py), so an f32 export must reproduce them bit for bit: the q/k row
permutation, Gemma's 1 + w norms, tied heads and Llama 3's rope_freqs all round-trip.
"""

from __future__ import annotations

import gguf
import jax
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

import jft
from jft.errors import JftError
from jft.formats.bundled import bundled_path
from jft.formats.gguf_export import _tensor_type, _write_tokenizer, write_gguf_file
from jft.formats.gguf_file import GGUFFile
from jft.formats.loading import load_checkpoint
from jft.models import ModelConfig
from jft.models.config import RopeConfig
from jft.text.tokenizer import load_tokenizer_from_gguf
from tests.gguf_writer import write_gguf
from tests.hf_reference import TINY_CONFIGS, make_hf_model, save_hf_model

TOKENS = np.array([[1, 5, 40, 7, 99, 120, 3, 64, 17, 150]])
PROMPTS = ["The capital of France is", "def fibonacci(n):"]


def _tiny(family: str, tmp_path):
    source = write_gguf(make_hf_model(family), tmp_path / f"{family}.gguf", family)
    return jft.load(source, dtype="float32", compute_dtype="float32")


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_tiny_model_round_trips_exactly_in_f32(family, tmp_path):
    model = _tiny(family, tmp_path)
    path = tmp_path / "exported.gguf"
    write_gguf_file(model.config, model.params, model.tokenizer, path, quant="f32")
    again = jft.load(path, dtype="float32", compute_dtype="float32")

    jax.tree.map(np.testing.assert_array_equal, again.params, model.params)
    assert again.config == model.config
    np.testing.assert_array_equal(np.asarray(again.logits(TOKENS)),
                                  np.asarray(model.logits(TOKENS)))
    assert again.tokenizer.encode("the fox runs") == model.tokenizer.encode("the fox runs")


def test_types_follow_llama_cpp(tmp_path):
    """Norms and biases stay F32, weights take the quant; rows that are not whole Q8_0
    blocks fall back to F16 (the tiny models have none, so that case is asked directly)."""
    model = _tiny("qwen3", tmp_path)
    path = tmp_path / "q8.gguf"
    write_gguf_file(model.config, model.params, model.tokenizer, path, quant="q8_0")
    kinds = {name: tensor.kind.name for name, tensor in GGUFFile(path).tensors.items()}
    assert kinds["blk.0.attn_norm.weight"] == kinds["blk.0.attn_q_norm.weight"] == "F32"
    assert kinds["blk.0.ffn_up.weight"] == kinds["token_embd.weight"] == "Q8_0"
    assert _tensor_type("blk.0.ffn_down.weight", (64, 40), Q.Q8_0) == Q.F16
    assert _tensor_type("blk.0.attn_q.bias", (64,), Q.Q8_0) == Q.F32


def test_q4_0_export_trains_as_stored(tmp_path):
    """`--quant q4_0` writes llama.cpp's blocks; a quantized load keeps them as they are,
    and the model computes what the float load of the same file does."""
    from jft.models import forward

    model = _tiny("llama", tmp_path)
    path = tmp_path / "q4.gguf"
    write_gguf_file(model.config, model.params, model.tokenizer, path, quant="q4_0")
    assert GGUFFile(path).tensors["blk.0.ffn_up.weight"].kind == Q.Q4_0
    quantized = jft.load(path, dtype="float32", quantize="nf4")
    floats = jft.load(path, dtype="float32", compute_dtype="float32")
    layers = model.config.num_layers
    assert quantized.quantization.kept == {"Q4_0": 7 * layers}
    assert quantized.params["layers"]["down_proj"].format == "q4_0"
    tokens = np.arange(3, 12)[None]
    config = floats.config.replace(kernels="xla")
    np.testing.assert_allclose(np.asarray(forward(config, quantized.params, tokens)),
                               np.asarray(forward(config, floats.params, tokens)),
                               rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def smollm2():
    return jft.load("smollm2-135m-instruct", dtype="float32", compute_dtype="float32")


def test_smollm2_f16_generates_the_same(smollm2, tmp_path):
    path = tmp_path / "smollm2-f16.gguf"
    write_gguf_file(smollm2.config, smollm2.params, smollm2.tokenizer, path, quant="f16")
    again = jft.load(path, dtype="float32", compute_dtype="float32")

    assert again.config == smollm2.config
    for text in ["Hello, world!", "  indented\tcode 12345", "<|im_start|>user\nhi<|im_end|>"]:
        assert again.tokenizer.encode(text) == smollm2.tokenizer.encode(text)
    assert again.tokenizer.chat_template == smollm2.tokenizer.chat_template
    assert again.generate(PROMPTS, max_new_tokens=8) == smollm2.generate(PROMPTS, max_new_tokens=8)


def test_smollm2_q8_0_logits_close(smollm2, tmp_path):
    path = tmp_path / "smollm2-q8_0.gguf"
    write_gguf_file(smollm2.config, smollm2.params, smollm2.tokenizer, path, quant="q8_0")
    again = jft.load(path, dtype="float32", compute_dtype="float32")
    ids = smollm2.tokenizer.encode(PROMPTS[0])
    expected, got = np.asarray(smollm2.logits(ids)), np.asarray(again.logits(ids))
    # Q8_0 keeps ~8 bits per weight: measured max |diff| 0.63 on logits spanning ~±30
    assert np.abs(got - expected).max() < 1.5
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.8


def test_gemma_sentencepiece_tokenizer_round_trips(tmp_path):
    """The bundled Gemma 3 file's tokenizer, written back, reads the same: same tokens
    (runs of spaces spelled with spaces, as llama.cpp's files do) and same token ids."""
    original = GGUFFile(bundled_path("gemma3-270m")).metadata
    tokenizer = load_tokenizer_from_gguf(original)
    config = ModelConfig(family="gemma3", vocab_size=len(original["tokenizer.ggml.tokens"]),
                         embed_dim=8, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8,
                         mlp_dim=8, norm_eps=1e-6, rope=RopeConfig(), layer_types=("full",),
                         norm_plus_one=True)
    writer = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "gemma3")
    _write_tokenizer(writer, tokenizer, config)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    written = GGUFFile(tmp_path / "tok.gguf").metadata
    assert written["tokenizer.ggml.tokens"] == original["tokenizer.ggml.tokens"]
    # Control tokens keep their type; user-defined ones the loader did not add as added
    # tokens (runs of spaces, matched by BPE anyway) come back NORMAL.
    changed = {(a, b) for a, b in zip(original["tokenizer.ggml.token_type"],
                                      written["tokenizer.ggml.token_type"], strict=True) if a != b}
    assert changed <= {(gguf.TokenType.USER_DEFINED, gguf.TokenType.NORMAL)}
    again = load_tokenizer_from_gguf(written)
    for text in ["  two  spaces\n\nnewlines", "<start_of_turn>user\nhi<end_of_turn>",
                 "héllo 日本 12345"]:
        assert again.encode(text) == tokenizer.encode(text)
    assert again.chat_template == tokenizer.chat_template


def test_bad_quant_is_a_one_line_error(tmp_path):
    model = _tiny("llama", tmp_path)
    with pytest.raises(JftError, match="quant 'q4_k'.*supported: f32, f16, q8_0"):
        write_gguf_file(model.config, model.params, model.tokenizer, tmp_path / "x.gguf", "q4_k")


def test_missing_tokenizer_is_an_error(tmp_path):
    model = _tiny("llama", tmp_path)
    with pytest.raises(JftError, match="no tokenizer"):
        write_gguf_file(model.config, model.params, None, tmp_path / "x.gguf")


def test_query_scale_gguf_cannot_state_is_an_error(tmp_path):
    """HF Gemma 2 states query_pre_attn_scalar; GGUF has no key for it."""
    save_hf_model("gemma2", tmp_path / "hf")
    checkpoint = load_checkpoint(tmp_path / "hf", dtype="float32")
    tokenizer = _tiny("gemma2", tmp_path).tokenizer
    with pytest.raises(JftError, match="query_scale cannot be expressed"):
        write_gguf_file(checkpoint.config, checkpoint.params, tokenizer, tmp_path / "x.gguf")
