"""`jft.merge`: several fine-tunes of one base combined into one model or one adapter.

    result = jft.merge("smollm2-135m-instruct", ["runs/a", "runs/b"], "ties",
                       weights=[1.0, 1.0], density=0.2)
    result.params      # the merged weights (task-vector methods), or
    result.adapter     # one LoRA (cat / svd of LoRA inputs)

Task-vector methods (`jft.merging.tensors.MERGE_METHODS`, and `lines`) merge the inputs'
task vectors leaf by leaf; `cat` and `svd` merge LoRA inputs in factor space, as PEFT's
`add_weighted_adapter`. docs/merging.md lists each method's options and defaults.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from jft.errors import JftError
from jft.merging.task_vectors import apply_task_vector, read_input, task_vector
from jft.merging.tensors import MERGE_METHODS, RANDOM_METHODS, merge_tensors

LORA_METHODS = ("cat", "svd")
METHODS = (*MERGE_METHODS, "lines", *LORA_METHODS)


@dataclasses.dataclass
class MergeResult:
    """What a merge gives: merged `params` (task-vector methods) or one LoRA `adapter`
    over the unchanged base (`cat`, `svd`); `vector` the merged task vector; `recipe` the
    inputs (paths and content hashes), method, options and seed."""

    model: Any  # the base jft.api.Model (its params are the base's)
    params: dict | None
    adapter: Any
    vector: dict | None
    recipe: dict


def merge(model, inputs: Sequence, method: str, weights: Sequence[float] | None = None, *,
          density: float = 1.0, seed: int = 0, majority_sign: str = "total",
          gamma: float = 0.01, epsilon: float = 0.15, scale: float = 1.0,
          lines_alpha: float | None = None, lines_beta: float | None = None,
          svd_rank: int | None = None) -> MergeResult:
    """Merges `inputs` (run directories, jft or PEFT adapters, merged HF directories of the
    base `model`: a name, path or a loaded `jft.api.Model`) with `method`.

    weights: one per input (default 1 each: the task-arithmetic sum; negative negates).
    scale: λ of θ = θ_0 + λ·τ_merged. density: the fraction kept by ties, dare_*,
    magnitude_prune, breadcrumbs*, della*. lines_alpha / lines_beta: LiNeS's α and β.
    svd_rank: the rank of `svd` (default: the largest input rank).
    """
    import jft

    if method not in METHODS:
        raise JftError(f"--method {method!r}; valid: {', '.join(METHODS)}")
    if not inputs:
        raise JftError("--inputs: give at least one input to merge")
    if not hasattr(model, "params"):  # a name or path, not a loaded Model
        model = jft.load(model, dtype="float32", compute_dtype="float32")
    weights = [1.0] * len(inputs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(inputs):
        raise JftError(f"--weights: {len(weights)} weights for {len(inputs)} inputs; give one "
                       "per input")
    if not 0.0 < density <= 1.0:
        raise JftError(f"--density must be in (0, 1], got {density}")
    base = model.params
    items = [read_input(path, base, model.config) for path in inputs]
    recipe = {"method": method, "inputs": [{"path": str(i.path), "sha256": i.digest}
                                           for i in items],
              "weights": weights, "seed": seed, "scale": scale}
    if method in LORA_METHODS:
        adapter = _lora_merge(method, items, weights, model.config, svd_rank)
        recipe["svd_rank"] = adapter.config.r if method == "svd" else None
        return MergeResult(model, None, adapter, None, recipe)
    vectors = [task_vector(item, base, model.config) for item in items]
    if method == "lines":
        merged, alpha, beta = _lines(vectors, weights, model.config, lines_alpha, lines_beta)
        recipe |= {"lines_alpha": alpha, "lines_beta": beta}
    else:
        merged = _merge_vectors(method, vectors, weights, model.config, density=density,
                                seed=seed, majority_sign=majority_sign, gamma=gamma,
                                epsilon=epsilon)
        recipe |= {"density": density, "majority_sign": majority_sign, "gamma": gamma,
                   "epsilon": epsilon}
    merged = {key: value * scale for key, value in merged.items()}
    return MergeResult(model, apply_task_vector(base, merged), None, merged, recipe)


def _merge_vectors(method, vectors, weights, model, **options) -> dict:
    """Weight by weight, as PEFT and mergekit merge one module's tensor at a time: each
    layer's slice of a stacked per-layer leaf on its own, a linear's as HF's [out, in]
    matrix (per-row rules, DELLA's, rank along its rows as they do). A leaf an input
    leaves alone is zero in its vector. Random methods draw each weight's masks from a
    seed of its own, derived from `seed` and its path."""
    keys = sorted({key for vector in vectors for key in vector})
    out = {}
    for key in keys:
        present = next(v[key] for v in vectors if key in v)
        tensors = [v.get(key, np.zeros_like(present)) for v in vectors]
        if key[0] == "layers":
            to_hf, from_hf = _hf_layout(model, key[-1], present.shape[1:])
            merged = np.stack([
                from_hf(_merge_one(method, [to_hf(t[i]) for t in tensors], weights,
                                   (*key, str(i)), options))
                for i in range(present.shape[0])])
        else:
            merged = _merge_one(method, tensors, weights, key, options)
        if np.any(merged):
            out[key] = merged
    return out


def _hf_layout(model, name: str, shape):
    """(to, back): one layer's slice of a per-layer leaf to the layout HF stores it in
    (a linear's [out, in] matrix; other leaves as they are), and back."""
    from jft.models.sites import site_names

    if name not in site_names(model):
        return (lambda x: x), (lambda x: x)
    from jft.models.sites import linear_site

    size_in, size_out = linear_site(model, name).sizes(model)
    return (lambda x: x.reshape(size_in, size_out).T), (lambda x: x.T.reshape(shape))


def _merge_one(method, tensors, weights, key, options):
    seed = options["seed"]
    if method in RANDOM_METHODS:
        text = f"{seed}/{'/'.join(key)}".encode()
        seed = int.from_bytes(hashlib.sha256(text).digest()[:4], "little")
    return merge_tensors(method, tensors, weights, **{**options, "seed": seed})


def _lines(vectors, weights, model, alpha, beta):
    """Task arithmetic, then LiNeS's depth-increasing scaling."""
    from jft.merging.lines import apply_lines, multi_task_alpha

    summed = _merge_vectors("linear", vectors, weights, model, density=1.0, seed=0,
                            majority_sign="total", gamma=0.01, epsilon=0.15)
    if alpha is None:
        alpha = 0.5 if len(vectors) == 1 else multi_task_alpha(
            [_tree(v) for v in vectors], _tree(summed))
    if beta is None:
        beta = 1.0 - alpha if len(vectors) == 1 else 0.5
    scaled = apply_lines(_tree(summed), alpha, beta, model.num_layers)
    return _flat(scaled), float(alpha), float(beta)


def _tree(vector: dict) -> dict:
    tree: dict = {}
    for key, value in vector.items():
        node = tree
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value
    return tree


def _flat(tree: dict, prefix=()) -> dict:
    out = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, (*prefix, name))
        else:
            out[(*prefix, name)] = np.asarray(value, np.float32)
    return out


def _lora_merge(method, items, weights, model, svd_rank):
    """One LoRA over the base from LoRA inputs (PEFT's `cat` / `svd`)."""
    from jft.merging import lora_factors
    from jft.peft import Adapter
    from jft.peft.lora import LoraConfig

    for item in items:
        adapter = item.adapter
        if item.kind != "adapter" or adapter.method != "lora":
            kind = "a merged model" if item.kind == "merged" else f"a {adapter.method} adapter"
            raise JftError(f"--inputs {item.path}: --method {method} merges LoRA factors; "
                           f"this is {kind} (use a task-vector method such as linear)")
    configs = [item.adapter.config for item in items]
    if any(c.init not in ("default", "gaussian") for c in configs):
        bad = next(i for i in items if i.adapter.config.init not in ("default", "gaussian"))
        raise JftError(f"--inputs {bad.path}: init {bad.adapter.config.init} rewrote the base; "
                       f"its factors alone are not its update (use a task-vector method)")
    rslora = configs[0].rslora
    per_input = [lora_factors.module_loras(item.adapter.delta, model, item.adapter.config)
                 for item in items]
    modules = sorted({m for loras in per_input for m in loras})
    layers, ranks = {}, []
    for module in modules:
        present = [(loras[module], w) for loras, w in zip(per_input, weights, strict=True)
                   if module in loras]
        loras, module_weights = [p[0] for p in present], [p[1] for p in present]
        if method == "cat":
            factors = lora_factors.cat(loras, module_weights, rslora=rslora)
        else:
            rank = svd_rank or max(c.r for c in configs)
            try:
                factors = lora_factors.svd(loras, module_weights, rank, rslora=rslora)
            except JftError as error:
                raise JftError(f"--svd-rank: {error}") from None
        layers[module] = (factors.a, factors.b)
        ranks.append(factors.r)
    rank = max(ranks)
    delta = {"layers": {m: {"a": np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, rank - a.shape[-1])]),
                            "b": np.pad(b, [(0, 0), (0, rank - b.shape[1])] +
                                        [(0, 0)] * (b.ndim - 2))}
                        for m, (a, b) in layers.items()}}
    alpha = lora_factors._alpha(rank, rslora)
    config = LoraConfig(r=rank, alpha=alpha, targets=tuple(modules), rslora=rslora)
    return Adapter(delta, "lora", config)
