"""Logical axis names, and the hook that maps them onto a device mesh.

Model code names every parameter and activation dimension with a logical axis
(`batch`, `seq`, `vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `layers`)
and never mentions a mesh. A `LogicalRules` context, set up by the trainer, maps
those names to mesh axes; outside one, `constrain` does nothing, so the same model
code runs unsharded on one device.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS_NAMES = ("batch", "seq", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers")

LogicalAxes = tuple[str | None, ...]


@dataclass(frozen=True)
class LogicalRules:
    """A mesh plus the mesh axis (or axes, or None) that each logical axis maps to."""

    mesh: Mesh
    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...]

    def spec(self, axes: LogicalAxes, shape: Sequence[int] | None = None) -> PartitionSpec:
        """The PartitionSpec for a tensor with these logical axes.

        A mesh axis is used at most once per tensor; a dimension it does not divide
        stays replicated on it.
        """
        table = dict(self.rules)
        used: set[str] = set()
        entries = []
        for dim, name in enumerate(axes):
            mesh_axes = table.get(name) if name is not None else None
            if isinstance(mesh_axes, str):
                mesh_axes = (mesh_axes,)
            kept = []
            for axis in mesh_axes or ():
                size = self.mesh.shape[axis]
                if axis in used or size == 1:
                    continue
                if shape is not None and shape[dim] % (size * _product(self.mesh, kept)) != 0:
                    continue
                kept.append(axis)
            used.update(kept)
            entries.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
        return PartitionSpec(*entries)

    def sharding(self, axes: LogicalAxes, shape: Sequence[int] | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes, shape))


def _product(mesh: Mesh, axes: Sequence[str]) -> int:
    size = 1
    for axis in axes:
        size *= mesh.shape[axis]
    return size


_ACTIVE: contextvars.ContextVar[LogicalRules | None] = contextvars.ContextVar(
    "jft_logical_rules", default=None
)


@contextlib.contextmanager
def use_rules(rules: LogicalRules | None) -> Iterator[None]:
    """Makes `rules` the active mapping while tracing model code in this block."""
    token = _ACTIVE.set(rules)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_rules() -> LogicalRules | None:
    return _ACTIVE.get()


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """Pins an activation's sharding to its logical axes; a no-op without active rules."""
    rules = _ACTIVE.get()
    if rules is None:
        return x
    return jax.lax.with_sharding_constraint(x, rules.sharding(axes, x.shape))
