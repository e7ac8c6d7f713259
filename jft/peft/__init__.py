"""Parameter-efficient fine-tuning: deltas as pytrees of their own beside the frozen base.

`jft.peft.base` has the protocol and the targeting; each method is one module that
registers itself in `REGISTRY`.
"""

from jft.peft import lora
from jft.peft.base import REGISTRY, Adapter, MethodBase, Targets, get_method, register
from jft.peft.factory import create, make_config

__all__ = [
    "REGISTRY", "Adapter", "MethodBase", "Targets", "create", "get_method", "lora",
    "make_config", "register",
]
