"""LiNeS: Layer-increasing Network Scaling (Wang, Dimitriadis et al. 2024, arXiv 2410.17146;
repo wang-kee/LiNeS, `LiNeS_scaling`).

A post-training edit of a task vector τ (or of a merged multi-task vector): block ℓ's
part is scaled by λ_ℓ = α + β·ℓ/(L−1), ℓ = 0..L−1, rising with depth, and everything
outside the blocks (embeddings, final norm, head) by α. Shallow layers, which hold
general features, move back toward the base; deep layers keep the task's update.

- Single-task editing (less forgetting elsewhere): β = 1 − α, so the last block keeps all
  of τ and the first keeps α of it; the paper sweeps α over {1.0, 0.9, ..., 0.0}.
- Multi-task merging on top of a merge τ_MTV of T task vectors: α =
  `multi_task_alpha(task_vectors, merged)` = ‖Σ_t τ_t‖₁ / ‖τ_MTV‖₁ / T, and β is swept.

The tree is a task vector shaped like jft params: `tree["layers"][name]` stacks its
layers on axis 0, and every other leaf is outside the blocks. The scaling is linear in
the leaves, so apply it to ΔW-space task vectors; on a LoRA delta it would scale both a
and b (λ² on ΔW). Scale LoRA's per-layer scales by λ_ℓ instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jft.errors import JftError


def lines_scales(num_layers: int, alpha: float, beta: float) -> np.ndarray:
    """λ_ℓ = α + β·ℓ/(L−1) for ℓ = 0..L−1, [L] float64. One layer (L = 1) is the last
    block and gets α + β, as the top of the ramp."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int | np.integer) or (
            num_layers < 1):
        raise JftError(f"num_layers must be a positive integer, got {num_layers!r}")
    if num_layers == 1:
        return np.asarray([alpha + beta], np.float64)
    return alpha + beta * np.arange(num_layers, dtype=np.float64) / (num_layers - 1)


def multi_task_alpha(task_vectors: Sequence[Any], merged: Any) -> float:
    """LiNeS' α for a multi-task merge: (‖Σ_t τ_t‖₁ / ‖τ_MTV‖₁) · (1/T), with L1 norms over
    all leaves flattened (the sum is taken before the norm, as the reference's
    `tv_flat_checks.sum(dim=0).abs().sum()`). For task arithmetic's τ_MTV = Σ_t τ_t it
    is 1/T."""
    if len(task_vectors) == 0:
        raise JftError("task_vectors: need at least one task vector")
    structure = jax.tree.structure(merged)
    for t, tree in enumerate(task_vectors):
        if jax.tree.structure(tree) != structure:
            raise JftError(f"task_vectors[{t}]: its leaves differ from merged's; LiNeS "
                           "needs the task vectors and the merge over the same tree")
    leaves = [jax.tree.leaves(tree) for tree in task_vectors]
    summed = sum(np.abs(sum(np.asarray(leaf, np.float64) for leaf in group)).sum()
                 for group in zip(*leaves, strict=True))
    merged_norm = sum(np.abs(np.asarray(leaf, np.float64)).sum()
                      for leaf in jax.tree.leaves(merged))
    if merged_norm == 0:
        raise JftError("merged: the multi-task vector is all zeros, so ‖τ_MTV‖₁ = 0")
    return float(summed / merged_norm / len(task_vectors))


def apply_lines(tree: Mapping[str, Any], alpha: float, beta: float | None = None,
                num_layers: int | None = None) -> dict[str, Any]:
    """The tree with each leaf under `tree["layers"]` scaled by λ_ℓ along axis 0 and every
    other leaf by α. `beta` defaults to 1 − α (single-task editing); `num_layers` to the
    leading axis of the per-layer leaves. Leaves keep their dtype and array type."""
    if not isinstance(tree, Mapping) or "layers" not in tree:
        raise JftError("tree: LiNeS needs a params-shaped tree with a 'layers' entry "
                       "(per-layer leaves stacked on axis 0)")
    beta = 1.0 - alpha if beta is None else beta
    layer_leaves = jax.tree_util.tree_leaves_with_path(tree["layers"])
    if num_layers is None:
        if not layer_leaves:
            raise JftError("tree['layers'] has no leaves; give num_layers")
        num_layers = np.shape(layer_leaves[0][1])[0]
    for path, leaf in layer_leaves:
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] != num_layers:
            raise JftError(f"tree['layers']{jax.tree_util.keystr(path)}: shape "
                           f"{np.shape(leaf)} does not stack {num_layers} layers on axis 0")
    scales = lines_scales(num_layers, alpha, beta)

    def per_layer(leaf):
        return leaf * scales.reshape(-1, *([1] * (np.ndim(leaf) - 1))).astype(_dtype(leaf))

    scaled = {key: jax.tree.map(lambda leaf: leaf * np.asarray(alpha, _dtype(leaf)), value)
              for key, value in tree.items() if key != "layers"}
    scaled["layers"] = jax.tree.map(per_layer, tree["layers"])
    return scaled


def _dtype(leaf) -> np.dtype:
    return leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
