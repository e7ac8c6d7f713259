"""Logical axis names, and the hook that maps them onto a device mesh.

Model code names every parameter and activation dimension with a logical axis
(`batch`, `seq`, `vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, `layers`, and
on MoE models `experts`, `expert_mlp`, `gate_up`, `unit`) and never mentions a mesh. A
`LogicalRules` context, set up by the trainer, maps
those names to mesh axes; outside one, `constrain` does nothing, so the same model
code runs unsharded on one device.

Written here rather than taken from Flax's logical partitioning, which maps names the
same way but leaves a mesh axis that does not divide a dimension to fail at placement:
these rules replicate such a dimension with a warning naming the tensor (a 9-head model
on a 2-way tensor axis still runs), and the model code needs no Flax.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS_NAMES = ("batch", "seq", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers",
              "experts", "expert_mlp", "gate_up", "unit")

# One entry per dimension: a logical name, None (replicated), or a tuple of names for a
# dimension that flattens several (it may then take all of their mesh axes).
LogicalAxes = tuple[str | tuple[str, ...] | None, ...]
MeshAxes = str | tuple[str, ...] | None


class ReplicatedWarning(UserWarning):
    """A tensor dimension stays replicated on a mesh axis that does not divide it."""


@dataclass(frozen=True)
class LogicalRules:
    """A mesh plus the mesh axis (or axes, or None) that each logical axis maps to."""

    mesh: Mesh
    rules: tuple[tuple[str, MeshAxes], ...]

    def spec(self, axes: LogicalAxes, shape: Sequence[int] | None = None,
             name: str | None = None) -> PartitionSpec:
        """The PartitionSpec for a tensor with these logical axes.

        A mesh axis is used at most once per tensor; a dimension it does not divide stays
        replicated on it, with a `ReplicatedWarning` naming the tensor when `name` is given.
        """
        table = dict(self.rules)
        used: set[str] = set()
        entries = []
        for dim, logical in enumerate(axes):
            wanted = []
            for part in (logical,) if isinstance(logical, str) or logical is None else logical:
                mapped = table.get(part) if part is not None else None
                wanted += [mapped] if isinstance(mapped, str) else list(mapped or ())
            kept = []
            for axis in wanted:
                size = self.mesh.shape[axis]
                if axis in used or axis in kept or size == 1:
                    continue
                if shape is not None and shape[dim] % (size * _product(self.mesh, kept)):
                    if name is not None:
                        split = " x ".join(f"{a}={self.mesh.shape[a]}" for a in [*kept, axis])
                        _warn_once(f"{name}: dimension {dim} ({logical}, size {shape[dim]}) "
                                   f"does not split over {split}; it stays replicated on "
                                   f"{axis!r}")
                    continue
                kept.append(axis)
            used.update(kept)
            entries.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
        return PartitionSpec(*entries)

    def sharding(self, axes: LogicalAxes, shape: Sequence[int] | None = None,
                 name: str | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes, shape, name))


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    # Python's own once-per-location registry is reset whenever any library touches the
    # warning filters, and the same tensor's layout is asked for at load and at jit.
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, ReplicatedWarning, stacklevel=4)


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
