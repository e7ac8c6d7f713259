"""The protocol every selection method follows, and what they share.

A method reads the pool (and the target set, when it needs one) through the `Context`
and returns a `Selection`: the chosen indices, best first, a score for every pool
record (higher = preferred; NaN where it gave none) and, for clustering methods, each
record's cluster. Methods register by name; `python -m jft.select --method NAME` finds
them in `METHODS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from jft.errors import JftError

METHODS: dict[str, SelectionMethod] = {}


@dataclass
class Context:
    """What a method works from. `model` is a loaded `jft.Model` (its adapters applied);
    `options` the command's method options; `work_dir` where a method may train."""

    model: Any
    pool: Any  # jft.select.pool.Pool
    target: Any | None
    budget: int
    options: Any
    seed: int = 0
    batch_size: int = 16
    work_dir: Path | None = None
    cache_dir: Path | None = None  # where embeddings and losses are kept between runs

    @property
    def adapters(self) -> tuple:
        return tuple(self.model.adapters)

    def embeddings(self, of: str = "pool") -> np.ndarray:
        """[N, D] mean final hidden states of the pool's (or the target's) examples."""
        from jft.select.features import embeddings

        pool = self.pool if of == "pool" else self.target
        return self.cached(f"embeddings-{of}", lambda: embeddings(
            self.model.config, self.model.params, self.adapters, pool.examples,
            batch_size=self.batch_size, desc=f"embeddings: {of}"), pool=pool)

    def losses(self, part: str = "examples") -> np.ndarray:
        """[N] mean target cross-entropy of the pool's examples, or of their answers alone."""
        from jft.select.features import target_losses

        return self.cached(f"losses-{part}", lambda: target_losses(
            self.model.config, self.model.params, self.adapters, getattr(self.pool, part),
            batch_size=self.batch_size, desc=f"losses: {part}"))

    def cached(self, kind: str, compute, sources=(), pool=None) -> np.ndarray:
        """`compute()`, read from `cache_dir` where an earlier run stored it for the same
        `kind`, model, adapter, pool (by content), format and max length, and the same
        files under `sources` (by name, size and time)."""
        if self.cache_dir is None:
            return compute()
        key = cache_key(kind, self.model.source, [self.options.adapter, *sources],
                        pool or self.pool, self.options.max_length)
        path = Path(self.cache_dir) / f"{kind}-{key}.npy"
        if path.is_file():
            return np.load(path, allow_pickle=False)
        values = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial.npy")
        np.save(partial, values, allow_pickle=False)
        partial.replace(path)
        return values


def cache_key(kind: str, model, sources, pool, max_length: int) -> str:
    import hashlib

    digest = hashlib.sha256()
    for part in (kind, str(model), *map(str, sources), pool.format, str(max_length)):
        digest.update(part.encode() + b"\0")
    for source in sources:  # an adapter retrained in place: other files, or rewritten ones
        if source is None:
            continue
        source = Path(source)
        for file in sorted(source.rglob("*")) if source.is_dir() else [source]:
            if file.is_file():
                stat = file.stat()
                digest.update(f"{file}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    files = sorted(pool.path.rglob("*")) if pool.path.is_dir() else [pool.path]
    for file in files:
        if file.is_file():
            with open(file, "rb") as stream:
                for chunk in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


@dataclass
class Selection:
    indices: np.ndarray  # [budget] chosen pool indices, best first
    scores: np.ndarray  # [N] float, higher = preferred; NaN: not scored
    clusters: np.ndarray | None = None  # [N] int
    report: list[str] = field(default_factory=list)  # lines for the stderr report


class SelectionMethod:
    name: ClassVar[str]
    needs_target: ClassVar[bool] = False

    def select(self, context: Context) -> Selection:
        raise NotImplementedError


def register(cls: type[SelectionMethod]) -> type[SelectionMethod]:
    METHODS[cls.name] = cls()
    return cls


def top(scores: np.ndarray, budget: int, eligible: np.ndarray | None = None) -> np.ndarray:
    """The `budget` highest scores, best first; ties go to the earlier record, so the
    choice is deterministic. NaN scores and records not `eligible` are never chosen."""
    scores = np.asarray(scores, np.float64)
    ok = np.isfinite(scores) if eligible is None else np.isfinite(scores) & eligible
    candidates = np.flatnonzero(ok)
    order = candidates[np.lexsort((candidates, -scores[candidates]))]
    return order[:budget]


def get_method(name: str) -> SelectionMethod:
    from jft.select import methods  # noqa: F401 (registers them)

    if name not in METHODS:
        raise JftError(f"--method {name!r}; valid: {', '.join(sorted(METHODS))}")
    return METHODS[name]
