"""The protocol every continual strategy implements, and the registry of them.

A strategy decides, per stage, what trains over which base (`carry`), with which method
config (`stage_method`), loss (`objective`) and data (`replay`), and what happens after
the stage (`after_stage`: ConPET fits its selector) and at inference (`route`). The run
(`jft.continual.run.ContinualRun`) does the rest: stages, checkpoints, evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from jft.objectives.sft import SFT

# How one stage's adapter reaches the next:
#   carry     the same adapter trains on (a fresh optimiser each stage)
#   merge     merged into the base; a fresh adapter per stage
#   stack     kept frozen in the stack; a fresh adapter per stage on top (O-LoRA)
#   separate  kept aside, one per task; a fresh adapter per stage over the base (ConPET)
Carry = Literal["carry", "merge", "stack", "separate"]


@dataclass(frozen=True)
class Replay:
    """Examples a stage replays (tokenized like the task's data) and the rows of each
    batch they fill."""

    examples: Any  # a TokenizedExamples
    rows: int


class Strategy:
    """No-op hooks: plain sequential fine-tuning with one adapter carried on."""

    name: ClassVar[str] = ""
    method: ClassVar[str | None] = None  # the PEFT method it trains, where it needs one

    @dataclass(frozen=True)
    class Options:
        pass

    def check(self, config, context) -> None:
        """Refuses a config the strategy cannot run (`context.fail(key, message)`); by
        default, one whose method is not the strategy's `method`."""
        if self.method and config.base.method.name != self.method:
            context.fail("method.name", f"continual.strategy {self.name} trains the "
                         f"{self.method} method; set method.name: {self.method} (got "
                         f"{config.base.method.name})")

    def carry(self, options) -> Carry:
        return "carry"

    def stage_method(self, config, options, index: int):
        """The `MethodSection` stage `index` trains (the config's by default)."""
        return config.base.method

    def objective(self, run, options, index: int):
        return SFT

    def replay(self, run, options, index: int) -> Replay | None:
        return None

    def after_stage(self, run, options, index: int) -> dict[str, float]:
        """Work after stage `index` trained (before it is evaluated); returns metrics for
        continual.json's `stages` entry."""
        return {}

    def route(self, run, options, index: int, prompts) -> list[int] | None:
        """Which stage's adapters answer each prompt (ids) after stage `index`, for
        strategies that keep one adapter per task; None: the stage's own adapters."""
        return None


STRATEGIES: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    STRATEGIES[strategy.name] = strategy
    return strategy
