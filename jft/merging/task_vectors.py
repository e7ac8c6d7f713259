"""Merge inputs as task vectors: τ = θ_fine-tuned − θ_base, one array per base leaf.

An input is a `jft.train` run directory, a jft adapter, a PEFT adapter, or a merged HF
directory of the same base. An adapter's task vector is its merge into the base minus
the base (exact for every method that has weights: LoRA's s·AB, SpIEL's and S²FT's
sparse entries, IA³'s and SSF's scalings folded in); a merged directory's is its
difference from the base. Leaves an input does not change are absent from its vector.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from jft.errors import JftError

# Virtual tokens are inputs, not weights; routed LoRA experts are a function of the input.
UNMERGEABLE = ("prompt_tuning", "prefix_tuning", "mixlora", "mola")


@dataclass
class MergeInput:
    """One input: where it came from, a content hash of its files, and (for adapters) the
    adapter over the base it applies to."""

    path: Path
    kind: str  # "adapter", "merged" or "vector" (a compressed task vector)
    digest: str
    adapter: object | None = None
    # the base it applies to (adapter), its weights (merged), or {leaf path: τ} (vector)
    params: dict | None = None


def read_input(path: str | os.PathLike, base: dict, model, flag: str = "--inputs"
               ) -> MergeInput:
    """An input read over `base` (float32 params of `model`); JftError naming it when it
    is missing, of another architecture, or a method with no weights."""
    from jft.formats.adapters import load_adapter
    from jft.formats.jft_adapter import architecture

    path = Path(path)
    if not path.exists():
        raise JftError(f"{flag} {path}: no such file or directory")
    digest = content_hash(path)
    from jft.merging.compress import COMPRESSED_FILE, load_compressed

    if (path / COMPRESSED_FILE).is_file():  # a ComPEFT task vector (jft.merge's compress)
        vector = {tuple(name.split("/")): value
                  for name, value in load_compressed(path / COMPRESSED_FILE).items()}
        return MergeInput(path, "vector", digest, params=vector)
    if (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        from jft.formats.loading import load_checkpoint

        checkpoint = load_checkpoint(path, "float32")
        theirs, ours = architecture(checkpoint.config), architecture(model)
        if theirs != ours:
            field = next(k for k in ours if theirs[k] != ours[k])
            raise JftError(f"{flag} {path}: a model with {field}={theirs[field]!r}, the base "
                           f"has {ours[field]!r}; merge inputs must share their base")
        return MergeInput(path, "merged", digest, params=checkpoint.params)
    try:
        params, (adapter,) = load_adapter(path, base, model)
    except JftError as error:
        raise JftError(f"{flag} {path}: {error}") from None
    if adapter.method in UNMERGEABLE:
        raise JftError(f"{flag} {path}: {adapter.method} trains virtual tokens, not weights; "
                       "it has no task vector to merge")
    return MergeInput(path, "adapter", digest, adapter=adapter, params=params)


def task_vector(item: MergeInput, base: dict, model) -> dict[tuple[str, ...], np.ndarray]:
    """{leaf path: τ} (float32) for the leaves the input changes."""
    if item.kind == "vector":
        return {key: np.asarray(value, np.float32) for key, value in item.params.items()}
    if item.kind == "merged":
        tuned = item.params
    else:
        adapter = item.adapter
        tuned = adapter.impl.merge(item.params, adapter.delta, model, adapter.config)
    out = {}
    flat_base = dict(_leaves(base))
    for key, leaf in _leaves(tuned):
        if key not in flat_base:
            continue
        difference = np.asarray(leaf, np.float32) - np.asarray(flat_base[key], np.float32)
        if np.any(difference):
            out[key] = difference
    return out


def apply_task_vector(base: dict, vector: dict[tuple[str, ...], np.ndarray], scale=1.0) -> dict:
    """base + scale·τ, leaf by leaf (float32)."""
    def add(path, leaf):
        key = _key(path)
        if key not in vector:
            return leaf
        return (np.asarray(leaf, np.float32) + scale * vector[key]).astype(np.float32)

    return jax.tree_util.tree_map_with_path(add, base)


def content_hash(path: Path) -> str:
    """sha256 over the input's files (names and bytes), for the merge recipe."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _leaves(tree):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        yield _key(path), leaf


def _key(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
