"""The device mesh (`data`, `fsdp`, `tensor`) and the presets that map logical axes onto it.

- data: replicas of the params, each on its own slice of the batch;
- fsdp: the batch is split over it too, and the params are sharded on their `embed`
  dimension and gathered layer by layer (ZeRO-3);
- tensor: heads, KV heads, MLP channels and the vocabulary are split over it (Megatron).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import jax
from jax.sharding import AxisType, Mesh

from jft.errors import JftError
from jft.sharding.logical import AXIS_NAMES, LogicalRules, MeshAxes

MESH_AXES = ("data", "fsdp", "tensor")

_BATCH = ("batch", ("data", "fsdp"))
PRESETS: dict[str, tuple[tuple[str, MeshAxes], ...]] = {
    "data_parallel": (_BATCH,),
    "fsdp": (_BATCH, ("embed", "fsdp")),
    # An expert's MLP splits over `tensor` like a dense MLP; `experts: tensor` (or fsdp)
    # instead gives expert parallelism, each device holding whole experts.
    "fsdp_tp": (_BATCH, ("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"),
                ("mlp", "tensor"), ("expert_mlp", "tensor"), ("vocab", "tensor")),
}


@dataclass(frozen=True)
class MeshConfig:
    """`mesh`: axis sizes (-1: the devices the other axes leave) and the axis rules."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    preset: str = "fsdp_tp"
    # logical axis -> mesh axis, list of mesh axes, or None; replaces the preset's entry.
    rules: Mapping[str, MeshAxes | list[str]] = field(default_factory=dict)

    def shape(self, device_count: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        for name, size in zip(MESH_AXES, sizes, strict=True):
            if size == 0 or size < -1:
                raise JftError(f"mesh.{name}={size}; give a positive size, or -1 for the rest "
                               "of the devices")
        if sizes.count(-1) > 1:
            raise JftError("mesh: more than one of data, fsdp, tensor is -1; at most one axis "
                           "takes the rest of the devices")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if device_count % known:
                raise JftError(f"mesh: {device_count} devices do not split into the given "
                               f"axes (product {known}); sizes must divide the device count")
            sizes[sizes.index(-1)] = device_count // known
        if math.prod(sizes) != device_count:
            raise JftError(
                f"mesh.data x mesh.fsdp x mesh.tensor = {' x '.join(map(str, sizes))} = "
                f"{math.prod(sizes)}, but there are {device_count} devices; the sizes must "
                "multiply to the device count (use -1 on one axis for the rest)")
        return tuple(sizes)

    def rule_table(self) -> tuple[tuple[str, MeshAxes], ...]:
        if self.preset not in PRESETS:
            raise JftError(f"mesh.preset={self.preset!r}; valid: {', '.join(PRESETS)}")
        table = dict(PRESETS[self.preset])
        for logical, target in self.rules.items():
            if logical not in AXIS_NAMES:
                raise JftError(f"mesh.rules.{logical}: unknown logical axis; valid: "
                               f"{', '.join(AXIS_NAMES)}")
            targets = [target] if isinstance(target, str) else list(target or ())
            bad = [t for t in targets if t not in MESH_AXES]
            if bad:
                raise JftError(f"mesh.rules.{logical}={target!r}: {bad[0]!r} is not a mesh "
                               f"axis; valid: {', '.join(MESH_AXES)}, a list of them, or null")
            table[logical] = tuple(targets) if len(targets) > 1 else (
                targets[0] if targets else None)
        return tuple(table.items())


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over all devices of every process, topology-aware."""
    devices = list(jax.devices() if devices is None else devices)
    shape = config.shape(len(devices))
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                             devices=devices)
    except (ValueError, NotImplementedError) as error:  # e.g. multi-slice TPU pods
        raise JftError(f"mesh {shape} does not fit these devices: {error}") from None


def make_rules(config: MeshConfig, devices: Sequence[jax.Device] | None = None
               ) -> LogicalRules:
    return LogicalRules(make_mesh(config, devices), config.rule_table())
