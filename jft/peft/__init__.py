"""Parameter-efficient fine-tuning: deltas as pytrees of their own beside the frozen base.

`jft.peft.base` has the protocol and the targeting; each method is one module that
registers itself in `REGISTRY`.
"""

from jft.peft import (  # each module registers its method
    bitfit,
    full,
    hft,
    ia3,
    lisa,
    lora,
    mixlora,
    mola,
    norm_tuning,
    osf,
    prefix_tuning,
    prompt_tuning,
    s2ft,
    sparse_delta,
    spiel,
    ssf,
)
from jft.peft.base import REGISTRY, Adapter, MethodBase, Targets, get_method, register
from jft.peft.factory import create, make_config

__all__ = [
    "REGISTRY", "Adapter", "MethodBase", "Targets", "bitfit", "create", "full",
    "get_method", "hft", "ia3", "lisa", "lora", "make_config", "mixlora", "mola",
    "norm_tuning", "osf", "prefix_tuning", "prompt_tuning", "register", "s2ft",
    "sparse_delta", "spiel", "ssf",
]
