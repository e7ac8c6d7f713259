"""Loading streams tensor by tensor: peak host memory stays near the model's own size.

Each load runs in a fresh process, which reports its peak RSS (VmHWM) above the RSS
it had once JAX was initialised. Besides the model itself, the allowance is 20% plus a
fixed 64 MB: XLA compiles one small in-place update program per parameter shape
(about 4 MB each).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from jft.formats.bundled import bundled_path

MEASURE = """
import sys
import jax, jax.numpy as jnp
from jft.formats.loading import load_checkpoint

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

jnp.zeros(4).block_until_ready()
base = rss("VmRSS")
checkpoint = load_checkpoint(sys.argv[1], dtype=sys.argv[2])
jax.block_until_ready(checkpoint.params)
size = sum(x.nbytes for x in jax.tree.leaves(checkpoint.params))
print(size, rss("VmHWM") - base)
"""


def _peak(model, dtype) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(model), dtype], capture_output=True, text=True,
        check=True,
    )
    size, peak = out.stdout.split()
    return int(size), int(peak)


@pytest.fixture(scope="module")
def fp32_checkpoint(tmp_path_factory):
    """A ~490 MB fp32 Llama checkpoint with random weights, written without torch."""
    from safetensors.numpy import save_file

    d, f, layers, vocab, heads, kv = 1024, 2816, 8, 16000, 16, 4
    rng = np.random.default_rng(0)

    def weight(*shape):
        return rng.standard_normal(shape, np.float32)

    tensors = {
        "model.embed_tokens.weight": weight(vocab, d),
        "model.norm.weight": np.ones(d, np.float32),
        "lm_head.weight": weight(vocab, d),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": np.ones(d, np.float32),
            p + "post_attention_layernorm.weight": np.ones(d, np.float32),
            p + "self_attn.q_proj.weight": weight(d, d),
            p + "self_attn.k_proj.weight": weight(kv * d // heads, d),
            p + "self_attn.v_proj.weight": weight(kv * d // heads, d),
            p + "self_attn.o_proj.weight": weight(d, d),
            p + "mlp.gate_proj.weight": weight(f, d),
            p + "mlp.up_proj.weight": weight(f, d),
            p + "mlp.down_proj.weight": weight(d, f),
        }
    directory = tmp_path_factory.mktemp("big")
    save_file(tensors, directory / "model.safetensors")
    config = dict(model_type="llama", hidden_size=d, intermediate_size=f,
                  num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=False)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_safetensors_load_peak_memory_is_near_model_size(fp32_checkpoint, dtype):
    size, peak = _peak(fp32_checkpoint, dtype)
    assert size > 240e6
    assert peak <= 1.2 * size + 64e6, (size, peak)


def test_quantized_gguf_load_peak_memory_is_near_model_size():
    size, peak = _peak(bundled_path("smollm2-135m-instruct"), "float32")
    assert peak <= 1.2 * size + 64e6, (size, peak)
