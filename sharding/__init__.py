"""Sharding (`jft.sharding`): logical axis names mapped onto a device mesh by rules."""

from jft.sharding.logical import AXIS_NAMES, LogicalRules, active_rules, constrain, use_rules

__all__ = ["AXIS_NAMES", "LogicalRules", "active_rules", "constrain", "use_rules"]
