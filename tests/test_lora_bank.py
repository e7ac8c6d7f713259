"""A batch whose rows use different LoRA adapters runs as one forward (`peft/lora_bank.py`):
the vmap path's and separate per-row forwards' logits, with and without the multi-LoRA
kernels (interpret mode on CPU), for prefill and decode shapes; other banks keep vmap."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jft.models import ModelConfig, RopeConfig, RuntimePolicy, forward, init_params
from jft.peft import create, lora_bank, named
from jft.peft.named import forward_per_row

MODEL = ModelConfig(
    family="llama", vocab_size=48, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16, mlp_dim=128, norm_eps=1e-6, rope=RopeConfig(), layer_types=("full", "full"),
    policy=RuntimePolicy(dtype="float32"),
)
# Row 1 packs two examples, rows 2 and 3 are right-padded; decode is one token per row.
_SEGMENTS = np.array([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0, 0],
                      [1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]], np.int32)
SHAPES = {
    "prefill": (jnp.asarray(np.random.default_rng(0).integers(1, 48, size=(5, 7))),
                jnp.asarray(_SEGMENTS)),
    "decode": (jnp.asarray(np.random.default_rng(1).integers(1, 48, size=(5, 1))), None),
}
# Adapters 2 and 0 mixed with base rows (-1), in a bank of three: adapter 1 unused.
IDS = jnp.asarray([2, -1, 0, 2, -1])
# D -> [N, H], [N, H] -> D and F -> D layouts; fewer modules compile faster.
TARGETS = ["q_proj", "o_proj", "down_proj"]


@pytest.fixture(scope="module")
def params():
    """Random params, drawn with numpy into `init_params`' shapes (as `_lora` does): JAX's
    random inits compile a program per shape, seconds of a test this size."""
    shapes = jax.eval_shape(lambda: init_params(MODEL, jax.random.key(0)))
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray(path[-1].key.endswith("norm")
                                       + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype),
        shapes)


def _lora(params, seed, **options):
    """A LoRA adapter with random factors (a fresh one's zero B would add nothing), rank
    padding included: the forward must mask it."""
    shapes = jax.eval_shape(lambda: create("lora", jax.random.key(0), params, MODEL,
                                           **options)[1])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda leaf: jnp.asarray(0.1 * rng.standard_normal(leaf.shape),
                                                 leaf.dtype), shapes)


@jax.jit
def _one_forward(params, tokens, segment_ids, adapters):
    return forward(MODEL, params, tokens, segment_ids=segment_ids, adapters=adapters)


def _separate_forwards(params, tokens, segment_ids, ids, bank):
    """Each row alone through `forward` with its own adapter: the independent reference."""
    rows = []
    for row, adapter_id in enumerate(np.asarray(ids)):
        segments = None if segment_ids is None else segment_ids[row:row + 1]
        adapters = () if adapter_id < 0 else tuple(bank[adapter_id])
        rows.append(_one_forward(params, tokens[row:row + 1], segments, adapters)[0])
    return np.stack(rows)


def _per_row(kernels, vmapped=False):
    model = MODEL.replace(kernels=kernels)
    if vmapped:
        return jax.jit(lambda p, t, i, b, s: named._forward_per_row_vmapped(
            model, p, t, i, [tuple(entry) for entry in b], s))
    return jax.jit(lambda p, t, i, b, s: forward_per_row(model, p, t, i, b, s))


_close = functools.partial(chex.assert_trees_all_close, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_shared_config_bank_matches_the_vmap_path_and_separate_forwards(params, shape):
    """rsLoRA with per-module rank and alpha patterns: one config, so the vmap path runs."""
    options = dict(r=4, alpha=8, rslora=True, targets=TARGETS,
                   rank_pattern={"o_proj": 2, "down_proj": 3}, alpha_pattern={"q_proj": 3.0})
    bank = [[_lora(params, seed, **options)] for seed in range(3)]
    tokens, segment_ids = SHAPES[shape]
    fast = _per_row("xla")(params, tokens, IDS, bank, segment_ids)
    _close(fast, _per_row("xla", vmapped=True)(params, tokens, IDS, bank, segment_ids))
    _close(fast, _separate_forwards(params, tokens, segment_ids, IDS, bank))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_mixed_bank_matches_separate_forwards_with_and_without_kernels(params, shape):
    """Ranks, alphas, rsLoRA, patterns, targets and layers differ between adapters; the
    Pallas path (grouped for prefill, gathered for decode) gives the XLA path's logits."""
    bank = [
        [_lora(params, 1, r=2, alpha=4, targets=["q_proj", "o_proj"])],
        [_lora(params, 2, r=8, alpha=32, rslora=True, targets=["o_proj"])],
        [_lora(params, 3, r=4, alpha=16, targets=["o_proj", "down_proj"],
               rank_pattern={"down_proj": 6}, alpha_pattern={"o_proj": 2.0})],
        [_lora(params, 4, r=3, alpha=3, targets=["q_proj"], layers_to_transform=[1])],
    ]
    tokens, segment_ids = SHAPES[shape]
    ids = jnp.asarray([2, -1, 0, 2, 3])  # adapter 1 unused
    fast = _per_row("xla")(params, tokens, ids, bank, segment_ids)
    _close(fast, _separate_forwards(params, tokens, segment_ids, ids, bank))
    _close(_per_row("pallas")(params, tokens, ids, bank, segment_ids), fast)

    def jaxpr(kernels):
        return str(jax.make_jaxpr(_per_row(kernels))(params, tokens, ids, bank, segment_ids))

    with_kernels = jaxpr("pallas")
    assert "pallas_call" in with_kernels
    assert ("grouped_lora" in with_kernels) == (shape == "prefill")
    assert ("gathered_lora" in with_kernels) == (shape == "decode")
    assert "pallas_call" not in jaxpr("xla")


def test_lora_banks_take_one_forward_and_other_banks_the_vmap_path(params, monkeypatch):
    calls = []

    def spy(name, function):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return function(*args, **kwargs)
        monkeypatch.setattr(named, name, wrapped)

    spy("forward_lora_bank", lora_bank.forward_lora_bank)
    spy("_forward_per_row_vmapped", named._forward_per_row_vmapped)
    tokens, segment_ids = SHAPES["prefill"]

    def trace(bank):
        calls.clear()
        jaxpr = jax.make_jaxpr(lambda b: forward_per_row(MODEL, params, tokens, IDS, b,
                                                         segment_ids))(bank)
        return calls[:], jaxpr

    lora = [[_lora(params, seed, r=2, targets=["q_proj"])] for seed in range(3)]
    taken, jaxpr = trace(lora)
    assert taken == ["forward_lora_bank"]
    # One forward over the whole batch: its only scan (the layers') carries [B, T, D].
    scans = [eqn for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].outvars[0].aval.shape[:2] == tokens.shape
    assert trace([[_lora(params, seed, r=2, targets=["q_proj"], dora=True)]
                  for seed in range(3)])[0] == ["_forward_per_row_vmapped"]
    _, bitfit = create("bitfit", jax.random.key(0), params, MODEL)
    assert trace([entry + [bitfit] for entry in lora])[0] == ["_forward_per_row_vmapped"]
