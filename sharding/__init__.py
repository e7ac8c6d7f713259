"""Sharding (`jft.sharding`): a (data, fsdp, tensor) device mesh, logical axis names mapped
onto it by rules, the shardings of params, deltas, optimiser state and batches, and the
multi-host runtime."""

from jft.sharding.logical import (
    AXIS_NAMES,
    LogicalRules,
    ReplicatedWarning,
    active_rules,
    constrain,
    use_rules,
)
from jft.sharding.mesh import MESH_AXES, PRESETS, MeshConfig, make_mesh, make_rules

__all__ = [
    "AXIS_NAMES",
    "MESH_AXES",
    "PRESETS",
    "LogicalRules",
    "MeshConfig",
    "ReplicatedWarning",
    "active_rules",
    "constrain",
    "make_mesh",
    "make_rules",
    "use_rules",
]
