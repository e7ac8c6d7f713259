"""Qwen2-MoE and Qwen3-MoE load from GGUF files laid out as llama.cpp's converter writes
them (tests/gguf_writer.py): expert stacks per projection (`ffn_gate_exps`/`ffn_up_exps`
[E, F, D], `ffn_down_exps` [E, D, F]), routers in F32, Qwen2-MoE's shared-expert gate
squeezed to [D]. jft's load reproduces the HF model (F32, 1e-4) and agrees with
transformers' own GGUF loader on the same file (F32 and Q8_0, 1e-4: both run the weights
`gguf.quants.dequantize` decodes, which a Q8_0 file's params equal exactly). Routing
follows llama.cpp, whatever the converted checkpoint said. What jft does not do with MoE
GGUF (export, `quantize:`, Mixtral's `llama` files) refuses in one line.
"""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from jft.errors import JftError
from jft.formats.gguf_export import write_gguf_file
from jft.formats.loading import load_checkpoint
from jft.models import config_from_hf, forward, param_shapes
from jft.models.tensor_names import TOP_LEVEL, layer_sources
from jft.quant.params import QuantizeSpec
from tests.gguf_writer import write_gguf
from tests.hf_reference import MOE_CONFIGS, VOCAB, hf_logits, make_hf_model

FAMILIES = ["qwen2_moe", "qwen3_moe"]

# transformers 5.25 reads no expert width from GGUF metadata (its qwen2moe / qwen3moe
# mappings lack expert_feed_forward_length and expert_shared_feed_forward_length), so
# they are passed to it; norm_topk_prob it sets from the architecture, as jft does.
TRANSFORMERS_OVERRIDES = {
    "qwen2_moe": ("moe_intermediate_size", "shared_expert_intermediate_size"),
    "qwen3_moe": ("moe_intermediate_size",),
}

# llama.cpp's routing: qwen3moe renormalises the top-k weights, qwen2moe does not.
LLAMA_CPP_NORM_TOPK = {"qwen2_moe": False, "qwen3_moe": True}


def tokens(batch=2, length=13, seed=0):
    return np.random.default_rng(seed).integers(3, VOCAB, size=(batch, length))


def jft_logits(checkpoint, ids) -> np.ndarray:
    return np.asarray(forward(checkpoint.config.replace(dtype="float32"), checkpoint.params, ids))


def transformers_gguf_logits(path, hf_model, family, ids) -> np.ndarray:
    import torch
    import transformers

    overrides = {field: getattr(hf_model.config, field)
                 for field in TRANSFORMERS_OVERRIDES[family]}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32,
        attn_implementation="eager", **overrides)
    return hf_logits(model.eval(), ids)


def dequantized_params(path, config) -> dict:
    """The file's tensors decoded by gguf and laid out for jft by hand: the expert stacks
    [E, F, D] (gate, up) and [E, D, F] (down) -> [E, D, 2, F] and [E, F, D]."""
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}

    def read(name: str) -> np.ndarray:
        tensor = tensors[name]
        return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)

    def layer(key: str, i: int) -> np.ndarray:
        blk = f"blk.{i}."
        if key == "experts_gate_up":
            gate_up = np.stack([read(blk + "ffn_gate_exps.weight"),
                                read(blk + "ffn_up_exps.weight")], axis=1)  # [E, 2, F, D]
            return gate_up.transpose(0, 3, 1, 2)
        if key == "experts_down":
            return read(blk + "ffn_down_exps.weight").transpose(0, 2, 1)
        if key == "shared_expert_gate":  # [D] -> [D, 1]
            return read(blk + "ffn_gate_inp_shexp.weight")[:, None]
        return sources[key].to_jft(read(sources[key].gguf.format(i=i)), config)

    shapes = param_shapes(config)
    sources = layer_sources(config)
    params = {key: TOP_LEVEL[key].to_jft(read(TOP_LEVEL[key].gguf), config)
              for key in shapes if key != "layers"}
    params["layers"] = {key: np.stack([layer(key, i) for i in range(config.num_layers)])
                        for key in shapes["layers"]}
    return params


def _write_and_load(family, directory, qtype=Q.F32):
    hf_model = make_hf_model(family)
    path = write_gguf(hf_model, directory / f"{family}.gguf", family, qtype)
    return hf_model, path, load_checkpoint(path, dtype="float32")


@pytest.fixture(scope="module", params=FAMILIES)
def f32(request, tmp_path_factory):
    family = request.param
    return family, *_write_and_load(family, tmp_path_factory.mktemp(family))


@pytest.fixture(scope="module", params=FAMILIES)
def q8_0(request, tmp_path_factory):
    family = request.param
    return family, *_write_and_load(family, tmp_path_factory.mktemp(f"{family}-q8"), Q.Q8_0)


# ---------------------------------------------------------------- F32


def test_f32_gguf_logits_match_the_hf_model(f32):
    _, hf_model, _, checkpoint = f32
    ids = tokens()
    np.testing.assert_allclose(jft_logits(checkpoint, ids), hf_logits(hf_model, ids),
                               atol=1e-4, rtol=0)


def test_f32_gguf_logits_match_transformers_loading_the_same_file(f32):
    family, hf_model, path, checkpoint = f32
    ids = tokens()
    np.testing.assert_allclose(jft_logits(checkpoint, ids),
                               transformers_gguf_logits(path, hf_model, family, ids),
                               atol=1e-4, rtol=0)


def test_gguf_config_equals_the_config_from_hf_config_json(f32):
    _, hf_model, _, checkpoint = f32
    from_hf = config_from_hf(hf_model.config.to_dict(), "config.json")
    for field in dataclasses.fields(from_hf):
        expected = getattr(from_hf, field.name)
        if field.name == "rope":
            assert checkpoint.config.rope.theta == pytest.approx(expected.theta, rel=1e-6)
            continue
        if isinstance(expected, float):  # GGUF stores floats in 32 bits
            expected = pytest.approx(expected, rel=1e-6)
        assert getattr(checkpoint.config, field.name) == expected, field.name


def test_file_holds_the_expert_stacks_per_projection_as_llama_cpp_does(f32):
    family, hf_model, path, _ = f32
    config = hf_model.config
    experts, dim, width = config.num_experts, config.hidden_size, config.moe_intermediate_size
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}

    def shape(name):  # as gguf's numpy arrays read it: outermost first
        return tuple(int(d) for d in reversed(tensors[name].shape))

    for i in range(config.num_hidden_layers):
        assert shape(f"blk.{i}.ffn_gate_exps.weight") == (experts, width, dim)
        assert shape(f"blk.{i}.ffn_up_exps.weight") == (experts, width, dim)
        assert shape(f"blk.{i}.ffn_down_exps.weight") == (experts, dim, width)
        assert shape(f"blk.{i}.ffn_gate_inp.weight") == (experts, dim)
        assert f"blk.{i}.ffn_gate_up_exps.weight" not in tensors
        if family == "qwen2_moe":
            assert shape(f"blk.{i}.ffn_gate_inp_shexp.weight") == (dim,)
            assert shape(f"blk.{i}.ffn_down_shexp.weight") == (
                dim, config.shared_expert_intermediate_size)


# ---------------------------------------------------------------- quantized


def test_q8_0_params_equal_the_tensors_gguf_decodes(q8_0):
    _, _, path, checkpoint = q8_0
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == types["blk.2.ffn_down_exps.weight"] == Q.Q8_0
    assert types["blk.0.ffn_gate_inp.weight"] == Q.F32  # llama.cpp keeps routers in F32
    if "blk.0.ffn_down_shexp.weight" in types:  # rows of 48 do not fill Q8_0 blocks
        assert types["blk.0.ffn_down_shexp.weight"] == Q.F16
    expected = dequantized_params(path, checkpoint.config)
    assert set(checkpoint.params) == set(expected)
    assert set(checkpoint.params["layers"]) == set(expected["layers"])
    for key, value in expected["layers"].items():
        np.testing.assert_array_equal(np.asarray(checkpoint.params["layers"][key]), value,
                                      err_msg=key)
    for key in set(expected) - {"layers"}:
        np.testing.assert_array_equal(np.asarray(checkpoint.params[key]), expected[key],
                                      err_msg=key)


def test_q8_0_logits_match_transformers_loading_the_same_file(q8_0):
    # Not compared with the HF model: Q8_0's error can flip a token's chosen experts.
    family, hf_model, path, checkpoint = q8_0
    ids = tokens()
    np.testing.assert_allclose(jft_logits(checkpoint, ids),
                               transformers_gguf_logits(path, hf_model, family, ids),
                               atol=1e-4, rtol=0)


# ---------------------------------------------------------------- conventions


def test_routing_is_llama_cpps_whatever_the_checkpoint_said(f32, tmp_path):
    # The file cannot say norm_topk_prob: a checkpoint with the other setting converts to a
    # file that llama.cpp (and transformers) run with the architecture's own, i.e. as the
    # fixture's HF model (same seed, same weights) runs.
    family, hf_model, _, checkpoint = f32
    assert hf_model.config.norm_topk_prob is LLAMA_CPP_NORM_TOPK[family]
    flipped = not LLAMA_CPP_NORM_TOPK[family]
    extra = MOE_CONFIGS[family][1] | {"norm_topk_prob": flipped}
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(MOE_CONFIGS, family, (MOE_CONFIGS[family][0], extra))
        other_model, _, other = _write_and_load(family, tmp_path)
    assert other_model.config.norm_topk_prob is flipped
    assert other.config == checkpoint.config
    ids = tokens()
    ours = jft_logits(other, ids)
    np.testing.assert_allclose(ours, hf_logits(hf_model, ids), atol=1e-4, rtol=0)
    assert np.abs(ours - hf_logits(other_model, ids)).max() > 1e-2


def test_newer_converter_layouts_load(tmp_path):
    # `--fuse-gate-up-exps` keeps gate and up as one `ffn_gate_up_exps` [E, 2F, D], and
    # converters since 2025 keep the shared-expert gate [1, D]; transformers reads neither.
    hf_model = make_hf_model("qwen2_moe")
    path = write_gguf(hf_model, tmp_path / "qwen2_moe.gguf", "qwen2_moe",
                      fuse_gate_up_exps=True, squeeze=False)
    config = hf_model.config
    tensors = {t.name: tuple(int(d) for d in reversed(t.shape))
               for t in gguf.GGUFReader(path).tensors}
    assert tensors["blk.0.ffn_gate_up_exps.weight"] == (
        config.num_experts, 2 * config.moe_intermediate_size, config.hidden_size)
    assert "blk.0.ffn_gate_exps.weight" not in tensors
    assert tensors["blk.0.ffn_gate_inp_shexp.weight"] == (1, config.hidden_size)
    ids = tokens()
    np.testing.assert_allclose(jft_logits(load_checkpoint(path, dtype="float32"), ids),
                               hf_logits(hf_model, ids), atol=1e-4, rtol=0)


def test_what_gguf_does_not_do_for_moe_refuses_in_one_line(f32, tmp_path):
    family, _, path, checkpoint = f32
    with pytest.raises(JftError, match=f"family '{family}' cannot be written as GGUF") as error:
        write_gguf_file(checkpoint.config, checkpoint.params, checkpoint.tokenizer,
                        tmp_path / "out.gguf", "f32")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out.gguf").exists()
    with pytest.raises(JftError, match="does not cover mixture-of-experts models") as error:
        load_checkpoint(path, quantize=QuantizeSpec("int8"))
    assert "\n" not in str(error.value)


def test_mixtral_gguf_is_refused_in_one_line(tmp_path):
    # llama.cpp writes Mixtral as the `llama` architecture with `expert_count` set.
    path = write_gguf(make_hf_model("mixtral"), tmp_path / "mixtral.gguf", "mixtral")
    with pytest.raises(JftError, match="'llama' file is a mixture-of-experts model "
                                       r"\(4 experts per layer") as error:
        load_checkpoint(path)
    assert "\n" not in str(error.value)
