"""`gere`: General-samples Replay with the threshold-based margin loss (Zhang et al. 2025,
arXiv 2508.04676).

A fixed set of general texts (`general:`, or its first `replay_examples`) fills a share
of every batch. Before any training, the initial model's final hidden states (after the
final norm) over all their tokens give per-dimension thresholds μ ± threshold·σ; each
token's dimension is labelled negative (h0 <= low), positive (h0 >= high) or neutral by
the initial model, and the margin (TM) loss keeps the model's current hidden states h in
that state:

    negative  relu(h - low)    positive  relu(high - h)    neutral  relu(h - high) + relu(low - h)

summed over the replay rows' tokens and divided by the number of non-zero entries
(+1e-8), so it is exactly 0 before the first update. The loss is
CE + w·TM, CE the mean of the task rows' and the replay rows' cross-entropy, and w
`dy` (CE / TM, both stopped, so the two terms weigh the same; the paper's demo) or a
number (its trainer's default is 100).

The initial hidden states are recomputed in each step from the frozen base (a forward
pass over the replay rows without the adapter), which needs an adapter that starts as
the identity over an unchanged base: one adapter carried through the tasks, no merging.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jft.continual.mixing import gather, replay_rows
from jft.continual.strategies.base import Replay, Strategy, register
from jft.continual.strategies.replay import check_batch
from jft.models import forward
from jft.objectives.sft import SFT, hidden_token_losses
from jft.storage import save_safetensors
from jft.training.config import _field

THRESHOLDS_FILE = "gere_thresholds.safetensors"


def margin_loss(hidden, initial, low, high, valid):
    """GeRe's TM loss of hidden states [..., D] given the initial ones, the thresholds [D]
    and a mask [...] of the tokens that count."""
    hidden = hidden.astype(jnp.float32)
    negative, positive = initial <= low, initial >= high
    loss = jnp.where(negative, jax.nn.relu(hidden - low),
                     jnp.where(positive, jax.nn.relu(high - hidden),
                               jax.nn.relu(hidden - high) + jax.nn.relu(low - hidden)))
    loss = jnp.where(valid[..., None], loss, 0.0)
    return loss.sum() / (jnp.count_nonzero(loss) + 1e-8)


@dataclass(frozen=True, eq=False)
class GereObjective:
    """SFT on the task rows and the replayed ones, plus the margin loss on the last
    `rows` rows (the replay)."""

    rows: int
    low: np.ndarray
    high: np.ndarray
    weight: str | float
    name: ClassVar[str] = "gere"

    def loss(self, model, params, adapters, batch, rng):
        hidden, head = forward(model, params, batch["tokens"], batch["positions"],
                               batch["segment_ids"], adapters=adapters, rng=rng,
                               return_hidden=True)
        losses, mask = hidden_token_losses(model, hidden, head, batch)
        replayed = batch["replay"][:, None]
        ce_task = _mean(losses, mask & ~replayed)
        ce_replay = _mean(losses, mask & replayed)
        has_task, has_replay = (mask & ~replayed).any(), (mask & replayed).any()
        ce = jnp.where(has_task & has_replay, (ce_task + ce_replay) / 2,
                       jnp.where(has_task, ce_task, ce_replay))
        replay = {k: batch[k][-self.rows:] for k in ("tokens", "positions", "segment_ids")}
        initial, _ = forward(model, params, replay["tokens"], replay["positions"],
                             replay["segment_ids"], return_hidden=True)
        tm = margin_loss(hidden[-self.rows:], jax.lax.stop_gradient(initial).astype(
            jnp.float32), self.low, self.high, replay["segment_ids"] != 0)
        weight = (jax.lax.stop_gradient(ce) / (jax.lax.stop_gradient(tm) + 1e-8)
                  if self.weight == "dy" else self.weight)
        return ce + weight * tm, {"tokens": mask.sum(), "ce": ce, "margin_loss": tm}

    def held_out(self, model, params, adapters, batch):
        return SFT.held_out(model, params, adapters, batch)


def _mean(losses, mask):
    return jnp.sum(jnp.where(mask, losses, 0.0)) / jnp.maximum(mask.sum(), 1)


class Gere(Strategy):
    name = "gere"

    @dataclass(frozen=True)
    class Options:
        weight: str | float = "dy"  # "dy", or a fixed weight (the paper's trainer: 100)
        threshold: float = _field(1.0, above=0.0)  # thresholds at μ ± threshold·σ
        ratio: float = _field(0.25, above=0.0, below=1.0)  # each batch's rows replayed
        replay_examples: int | None = _field(None, min=1)  # None: all of `general`

    def check(self, config, context):
        options = config.continual.options
        if config.general is None:
            context.fail("general", "continual.strategy gere replays the general texts; set "
                         "general: to a plain-text file")
        if isinstance(options.weight, str) and options.weight != "dy":
            context.fail("continual.weight", f"continual.weight must be dy or a number, got "
                         f"{options.weight!r}")
        if config.base.method.name in ("lisa", "hft"):
            context.fail("method.name", f"continual.strategy gere needs an adapter that starts "
                         f"as the identity over the unchanged base; {config.base.method.name} "
                         "swaps base layers in")
        init = getattr(config.base.method.config, "init", "default")
        if init not in ("default", "gaussian"):
            context.fail("method.init", f"continual.strategy gere needs an adapter over the "
                         f"unchanged base; init {init} rewrites it (use default)")
        check_batch(config, context)

    def replay(self, run, options, index):
        return Replay(_replayed(run, options),
                      replay_rows(run.config.base.train.batch_size, options.ratio))

    def objective(self, run, options, index):
        low, high = thresholds(run, options)
        rows = replay_rows(run.config.base.train.batch_size, options.ratio)
        return GereObjective(rows, low, high, options.weight)


def _replayed(run, options):
    count = len(run.general_tokens)
    if options.replay_examples is not None:
        count = min(count, options.replay_examples)
    if count == len(run.general_tokens):
        return run.general_tokens
    return gather([run.general_tokens], [(0, i) for i in range(count)])


def thresholds(run, options) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) [D]: μ ∓ threshold·σ of the initial model's final hidden states over
    every token of the replayed texts, computed once and kept in the run directory."""
    from safetensors.numpy import load_file

    from jft.training.data import batcher

    path = run.directory / THRESHOLDS_FILE
    if path.exists():
        saved = load_file(path)
        return saved["low"], saved["high"]
    hidden_states = jax.jit(lambda params, b: forward(
        run.model_config, params, b["tokens"], b["positions"], b["segment_ids"],
        return_hidden=True)[0])
    total = total_sq = count = 0.0
    for batch in batcher(_replayed(run, options), run.general_data, run.tokenizer,
                         run.config.base.train.batch_size, split="eval"):
        hidden = np.asarray(hidden_states(run.original, batch), np.float64)
        valid = batch["segment_ids"] != 0
        total = total + hidden[valid].sum(0)
        total_sq = total_sq + (hidden[valid] ** 2).sum(0)
        count += valid.sum()
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
    low = (mean - options.threshold * std).astype(np.float32)
    high = (mean + options.threshold * std).astype(np.float32)
    save_safetensors({"low": low, "high": high}, path)
    return low, high


GERE = register(Gere())
