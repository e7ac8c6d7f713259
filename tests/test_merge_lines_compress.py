"""LiNeS layer scaling and ComPEFT compression, against their formulas written out in NumPy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jft.errors import JftError
from jft.merging.compress import (
    DEFAULT_DENSITY,
    CompressedTensor,
    compress_tensor,
    compress_tensors,
    compressed_bytes,
    decompress,
    load_compressed,
    save_compressed,
)
from jft.merging.lines import apply_lines, lines_scales, multi_task_alpha

RNG = np.random.default_rng(0)


def _tree(rng, layers=4):
    return {"embed": rng.normal(size=(10, 3)).astype(np.float32),
            "final_norm": rng.normal(size=(3,)).astype(np.float32),
            "layers": {"q_proj": rng.normal(size=(layers, 3, 2, 2)).astype(np.float32),
                       "attn_norm": rng.normal(size=(layers, 3)).astype(np.float32)}}


# ------------------------------------------------------------------ LiNeS


def test_lines_scales_rise_linearly_from_alpha_to_alpha_plus_beta():
    np.testing.assert_allclose(lines_scales(5, 0.2, 0.6), [0.2, 0.35, 0.5, 0.65, 0.8])
    np.testing.assert_allclose(lines_scales(1, 0.3, 0.5), [0.8])  # one layer: the top
    with pytest.raises(JftError, match="num_layers"):
        lines_scales(0, 0.5, 0.5)


def test_apply_lines_scales_layers_by_depth_and_the_rest_by_alpha():
    tree, alpha, beta = _tree(RNG), 0.3, 0.5
    out = apply_lines(tree, alpha, beta)
    for layer in range(4):
        lam = alpha + beta * layer / 3
        for name in ("q_proj", "attn_norm"):
            np.testing.assert_allclose(out["layers"][name][layer],
                                       tree["layers"][name][layer] * lam, rtol=1e-6)
    for name in ("embed", "final_norm"):
        np.testing.assert_allclose(out[name], tree[name] * alpha, rtol=1e-6)
        assert out[name].dtype == np.float32


def test_apply_lines_single_task_default_keeps_the_last_layer():
    tree = _tree(RNG)
    out = apply_lines(tree, 0.4)  # beta = 1 - alpha
    np.testing.assert_allclose(out["layers"]["q_proj"][-1], tree["layers"]["q_proj"][-1])
    np.testing.assert_allclose(out["layers"]["q_proj"][0], 0.4 * tree["layers"]["q_proj"][0],
                               rtol=1e-6)


def test_apply_lines_keeps_jax_arrays_and_dtypes():
    tree = {"layers": {"w": jnp.ones((3, 2), jnp.bfloat16)}, "embed": jnp.ones(2, jnp.bfloat16)}
    out = apply_lines(tree, 0.5, 0.5)
    assert isinstance(out["layers"]["w"], jnp.ndarray) and out["layers"]["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out["layers"]["w"][:, 0], np.float32), [0.5, 0.75, 1.0])


def test_apply_lines_refuses_a_leaf_of_the_wrong_depth():
    tree = _tree(RNG)
    tree["layers"]["bad"] = np.ones((3, 2))
    with pytest.raises(JftError, match=r"\['bad'\]"):
        apply_lines(tree, 0.5, 0.5)
    with pytest.raises(JftError, match="layers"):
        apply_lines({"embed": np.ones(2)}, 0.5)


def test_multi_task_alpha_is_l1_of_the_sum_over_l1_of_the_merge_over_t():
    vectors = [_tree(np.random.default_rng(seed)) for seed in range(3)]
    merged = _tree(np.random.default_rng(9))
    def flat(tree):
        return np.concatenate([np.ravel(x) for x in
                               [tree["embed"], tree["final_norm"], tree["layers"]["q_proj"],
                                tree["layers"]["attn_norm"]]]).astype(np.float64)
    expected = np.abs(sum(flat(v) for v in vectors)).sum() / np.abs(flat(merged)).sum() / 3
    assert multi_task_alpha(vectors, merged) == pytest.approx(expected, rel=1e-12)
    # task arithmetic's merge (the plain sum) gives 1/T
    summed = {"w": sum(v["embed"] for v in vectors)}
    assert multi_task_alpha([{"w": v["embed"]} for v in vectors], summed) == pytest.approx(
        1 / 3)
    with pytest.raises(JftError, match="task_vectors"):
        multi_task_alpha([], merged)
    with pytest.raises(JftError, match=r"task_vectors\[0\]"):
        multi_task_alpha([{"w": np.ones(2)}], merged)


# ------------------------------------------------------------------ ComPEFT


def _compeft_reference(x, density, multiplier):
    """Top-k by magnitude (stable order among equals), sign × multiplier · std (ddof 1)."""
    flat = x.ravel()
    k = int(density * flat.size)
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-np.abs(flat), kind="stable")[:k]] = True
    scale = np.float32(multiplier * np.std(flat.astype(np.float64), ddof=1))
    return np.where(keep, np.sign(flat).astype(np.float32) * scale, 0).reshape(x.shape)


@pytest.mark.parametrize("density", [0.0, 0.03, DEFAULT_DENSITY, 0.5, 1.0])
@pytest.mark.parametrize("multiplier", [1.0, 2.5])
def test_compress_then_decompress_is_the_compeft_formula(density, multiplier):
    x = RNG.normal(size=(37, 23)).astype(np.float32)
    compressed = compress_tensor(x, density, multiplier)
    got = decompress(compressed)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_array_equal(got, _compeft_reference(x, density, multiplier))
    assert compressed.count == int(density * x.size)
    assert compressed.encoding == ("indices" if 4 * compressed.count < (x.size + 7) // 8
                                   else "bitmask")


def test_equal_magnitudes_at_the_threshold_go_in_flat_order():
    x = np.array([1, -1, 2, 1, -1, 0.5, 1, 0.1, 0.2, 0.3], np.float32)
    kept = decompress(compress_tensor(x, density=0.3))  # k = 3: the 2, then 1 and -1
    np.testing.assert_array_equal(np.flatnonzero(kept), [0, 1, 2])
    np.testing.assert_array_equal(kept, _compeft_reference(x, 0.3, 1.0))


def test_compress_never_keeps_zeros_and_keeps_the_dtype():
    x = np.zeros(100, np.float32)
    x[:3] = [1.0, -2.0, 0.5]
    compressed = compress_tensor(x, density=0.5)
    assert compressed.count == 3
    np.testing.assert_array_equal(np.sign(decompress(compressed)), np.sign(x))
    bf16 = jnp.asarray(RNG.normal(size=(8, 8)), jnp.bfloat16)
    out = decompress(compress_tensor(bf16, 0.25))
    assert out.dtype == jnp.bfloat16 and np.count_nonzero(np.asarray(out, np.float32)) == 16


def test_global_scope_takes_one_topk_and_one_std_over_all_tensors():
    tensors = {"a": RNG.normal(size=(20, 5)).astype(np.float32),
               "b": 3 * RNG.normal(size=(7, 3)).astype(np.float32)}
    joined = np.concatenate([t.ravel() for t in tensors.values()])
    expected = _compeft_reference(joined, 0.3, 1.5)
    got = compress_tensors(tensors, 0.3, 1.5, scope="global")
    np.testing.assert_array_equal(
        np.concatenate([decompress(got[n]).ravel() for n in tensors]), expected)
    with pytest.raises(JftError, match="scope"):
        compress_tensors(tensors, scope="layer")


def test_save_load_round_trip(tmp_path):
    tensors = {"layers/q_proj/a": RNG.normal(size=(2, 16, 4)).astype(np.float32),
               "layers/q_proj/b": RNG.normal(size=(2, 4, 16)).astype(np.float32),
               "tiny": RNG.normal(size=(5,)).astype(np.float32)}
    path = tmp_path / "compeft.safetensors"
    saved = save_compressed(path, tensors, density=0.1, scale_multiplier=2.0)
    loaded = load_compressed(path)
    assert list(loaded) == list(tensors)
    for name, x in tensors.items():
        np.testing.assert_array_equal(loaded[name], _compeft_reference(x, 0.1, 2.0))
    raw = load_compressed(path, decompressed=False)
    assert all(isinstance(c, CompressedTensor) for c in raw.values())
    assert raw["tiny"].count == 0 and raw["layers/q_proj/a"].scale == saved[
        "layers/q_proj/a"].scale
    from safetensors.numpy import save_file

    other = tmp_path / "plain.safetensors"
    save_file({"x": np.ones(2, np.float32)}, str(other))
    with pytest.raises(JftError, match="not a jft ComPEFT file"):
        load_compressed(other)


def test_million_entries_at_density_tenth_take_1_1_bits_each():
    x = RNG.normal(size=(1000, 1000)).astype(np.float32)
    compressed = compress_tensor(x, density=0.1)
    assert compressed.encoding == "bitmask" and compressed.count == 100_000
    # n mask bits + k sign bits + the scale, against 32 n bits
    assert compressed_bytes(compressed) == 1_000_000 // 8 + 100_000 // 8 + 4
    ratio = x.nbytes / compressed_bytes(compressed)
    assert ratio == pytest.approx(32 / 1.1, rel=1e-4)  # ~29x smaller than float32
    sparse = compress_tensor(x, density=0.01)  # indices (4 bytes each) win below density 1/32
    assert sparse.encoding == "indices"
    assert compressed_bytes(sparse) == 4 * 10_000 + 10_000 // 8 + 4


def test_bad_density_names_the_field():
    with pytest.raises(JftError, match="density"):
        compress_tensor(np.ones(4), density=1.5)
    with pytest.raises(JftError, match="dtype"):
        compress_tensor(np.arange(4))
