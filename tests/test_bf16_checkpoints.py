"""bfloat16 safetensors, the dtype of most checkpoints people download, load: from
transformers' `save_pretrained` and from jft's own merged export."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import jft
from jft.formats.hf_export import write_hf_dir
from jft.formats.safetensors_io import SafetensorsFile
from tests.hf_reference import VOCAB, hf_logits, make_hf_model

TOKENS = np.random.default_rng(0).integers(3, VOCAB, size=(2, 11))


def test_transformers_bf16_checkpoint_loads_with_its_logits(tmp_path):
    import torch
    import transformers

    hf = make_hf_model("llama").to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    stored = SafetensorsFile(tmp_path / "model.safetensors")
    assert {info.dtype.name for info in stored.tensors.values()} == {"bfloat16"}

    model = jft.load(tmp_path, dtype="bfloat16")
    assert {leaf.dtype for leaf in jax_leaves(model.params)} == {jnp.dtype(jnp.bfloat16)}
    as_float = jft.load(tmp_path, dtype="float32", compute_dtype="float32")
    # The same bf16 file, computed in fp32 on both sides (transformers reloads it, so its
    # rotary tables are fp32 again, as jft's are).
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager")
    np.testing.assert_allclose(np.asarray(as_float.logits(TOKENS)),
                               hf_logits(reference, TOKENS), atol=1e-4, rtol=0)
    weight = hf.model.layers[0].mlp.down_proj.weight.detach().float().numpy()
    loaded = stored.read("model.layers.0.mlp.down_proj.weight")
    np.testing.assert_array_equal(loaded.astype(np.float32), weight)


def test_bf16_merged_export_loads_back(tmp_path):
    make_hf_model("qwen2").save_pretrained(tmp_path / "source")
    model = jft.load(tmp_path / "source", dtype="float32", compute_dtype="float32")
    write_hf_dir(model, tmp_path / "merged", "bf16")
    again = jft.load(tmp_path / "merged", dtype="float32", compute_dtype="float32")
    for ours, theirs in zip(jax_leaves(model.params), jax_leaves(again.params), strict=True):
        rounded = np.asarray(jnp.asarray(ours, jnp.bfloat16).astype(jnp.float32))
        np.testing.assert_array_equal(np.asarray(theirs), rounded)


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)
