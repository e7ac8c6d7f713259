"""Continual-learning strategies: one module each, registered in `STRATEGIES`."""

from jft.continual.strategies import (  # each module registers its strategy
    conpet,
    gere,
    hft,
    olora,
    osf,
    replay,
    sequential,
)
from jft.continual.strategies.base import STRATEGIES, Replay, Strategy, register

__all__ = ["STRATEGIES", "Replay", "Strategy", "conpet", "gere", "hft", "olora", "osf",
           "register", "replay", "sequential"]
