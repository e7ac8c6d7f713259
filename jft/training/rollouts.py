"""GRPO's batches: each step, `group_size` completions of `batch_size` prompts sampled with
the current adapter, scored by the rewards and turned into a fixed-shape training batch.

Every batch is [batch_size · group_size, prompt_len + max_new_tokens]: a row is one
completion after its prompt (left-aligned, one segment), the completion's tokens (its stop
token included) the targets, and each token carries its completion's advantage
(`jft.objectives.grpo`). prompt_len is the longest prompt of the data, rounded up, so
neither sampling nor the update ever recompiles. Prompts are drawn in a shuffled order per
epoch, as the Batcher draws examples; `state()` / `restore()` resume exactly: the sampling
key of rollout n is (seed, n). With `iterations` > 1 each rollout is updated on that many
times, carrying the sampling policy's log-probs (π_old).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from jft.errors import JftError
from jft.inference.generation import PROMPT_BUCKET, Sampling, _round_up, sample_tokens
from jft.objectives import rewards as reward_functions
from jft.objectives.grpo import ADVANTAGE_FIELD, OLD_LOGPS_FIELD, group_advantages, reward_names
from jft.training.data import completion_reference, pad_id

_STATE_VERSION = 1


class _Prompt(NamedTuple):
    record: dict  # the data record, as the reward functions see it
    ids: list[int]  # what sampling is fed
    prompt: str  # the prompt's text (a chat prompt as the template renders it)
    reference: str  # exact_match's answer


class Rollouts:
    """An endless iterator of GRPO batches; `last_metrics` describes the latest one."""

    def __init__(self, records, tokenizer, options, data_config, batch_size: int,
                 seed: int, current: Callable[[], tuple[Any, Any, Sequence]],
                 logps: Callable[[dict], Any]):
        """`current()`: (model config, params, adapters) to sample with now; `logps(batch)`:
        the current policy's per-token log-probs of a batch (π_old, with `iterations` > 1)."""
        self.options, self.batch_size, self.seed = options, batch_size, seed
        self.tokenizer, self.current, self.logps = tokenizer, current, logps
        self.batch: dict[str, np.ndarray] | None = None  # the rollout being updated on
        self.uses = 0  # updates made on it so far
        self.names = reward_names(options)
        self.rewards = reward_functions.load_rewards(self.names, options.pattern)
        self.examples = [self._example(record, data_config.format) for record in records]
        if not self.examples:
            raise JftError(f"{data_config.train}: no prompts to sample completions for")
        longest = max(len(e.ids) for e in self.examples)
        self.prompt_len = _round_up(longest, PROMPT_BUCKET)
        self.length = self.prompt_len + options.max_new_tokens
        self.sampling = Sampling(options.temperature, options.top_k, options.top_p)
        self.stop_ids = sorted(set(tokenizer.stop_ids))
        self.pad_id = pad_id(tokenizer)
        self.counters = dict.fromkeys(("examples", "tokens", "targets", "truncated", "dropped"), 0)
        self.epoch = self.index = self.drawn = 0
        self.last_metrics: dict[str, float] = {}

    def _example(self, record: Mapping, format: str) -> _Prompt:
        ids, reference = completion_reference(record, format, self.tokenizer)
        prompt = record["prompt"] if isinstance(record.get("prompt"), str) else (
            self.tokenizer.decode(ids, skip_special_tokens=False))
        field = self.options.answer_field
        if field is not None:
            if field not in record:
                raise JftError(f"objective.answer_field: the data has no field {field!r}; its "
                               f"fields: {', '.join(record)}")
            reference = str(record[field])
        return _Prompt(dict(record), list(ids), prompt, reference)

    # -- the Batcher's interface -----------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.batch is None or self.uses == self.options.iterations:
            self.batch, self.uses = self._rollout(), 0
        self.uses += 1
        return self.batch

    def _rollout(self) -> dict[str, np.ndarray]:
        examples = [self.examples[i] for i in self._next_indices()]
        group = self.options.group_size
        prompts = [e.ids for e in examples for _ in range(group)]
        config, params, adapters = self.current()
        key = jax.random.fold_in(jax.random.key(self.seed), self.drawn)
        self.drawn += 1
        completions = sample_tokens(config, params, prompts, self.options.max_new_tokens,
                                    self.stop_ids, self.sampling, key, adapters,
                                    prompt_len=self.prompt_len)
        scores, per_reward = [], []
        for row, ids in enumerate(completions):
            example = examples[row // group]
            text = self.tokenizer.decode([t for t in ids if t not in self.stop_ids])
            total, values = reward_functions.score(self.rewards, self.options.reward_weights,
                                                   example.prompt, text, example.record,
                                                   example.reference, self.names)
            scores.append(total)
            per_reward.append(values)
        advantages = group_advantages(np.asarray(scores), group, self.options.scale_rewards)
        self.last_metrics = self._metrics(np.asarray(scores), np.asarray(per_reward),
                                          completions)
        batch = self._assemble(prompts, completions, advantages)
        if self.options.iterations > 1:
            batch[OLD_LOGPS_FIELD] = np.asarray(self.logps(batch), np.float32)
        return batch

    def state(self) -> dict:
        """JSON: the position, and a rollout with updates still to come on it (sampled by
        a policy that is gone, so it is kept rather than drawn again)."""
        state = {"version": _STATE_VERSION, "epoch": self.epoch, "index": self.index,
                 "drawn": self.drawn, "counters": dict(self.counters),
                 "settings": {"prompts": len(self.examples), "batch_size": self.batch_size,
                              "seed": self.seed}}
        if self.batch is not None and self.uses < self.options.iterations:
            state["rollout"] = {"uses": self.uses, "metrics": self.last_metrics,
                                "batch": {k: [str(v.dtype), v.tolist()]
                                          for k, v in self.batch.items()}}
        return state

    def restore(self, state: Mapping) -> None:
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise JftError("data state: not a GRPO rollout state; resume with the same config")
        if state["settings"] != self.state()["settings"]:
            raise JftError(f"data state: it was saved with {state['settings']}, this run has "
                           f"{self.state()['settings']}; resume with the same data and settings")
        self.epoch, self.index, self.drawn = state["epoch"], state["index"], state["drawn"]
        self.counters = {k: int(v) for k, v in state["counters"].items()}
        rollout = state.get("rollout")
        if rollout is not None:
            self.batch = {k: np.asarray(values, dtype) for k, (dtype, values)
                          in rollout["batch"].items()}
            self.uses, self.last_metrics = rollout["uses"], rollout["metrics"]

    # -- internals -------------------------------------------------------------------------

    def _next_indices(self) -> list[int]:
        out = []
        while len(out) < self.batch_size:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(
                len(self.examples))
            take = order[self.index:self.index + self.batch_size - len(out)]
            out.extend(int(i) for i in take)
            self.index += len(take)
            if self.index >= len(self.examples):
                self.epoch, self.index = self.epoch + 1, 0
        return out

    def _assemble(self, prompts, completions, advantages) -> dict[str, np.ndarray]:
        shape = (len(prompts), self.length)
        tokens = np.full(shape, self.pad_id, np.int32)
        segment_ids = np.zeros(shape, np.int32)
        positions = np.zeros(shape, np.int32)
        loss_mask = np.zeros(shape, np.bool_)
        advantage = np.zeros(shape, np.float32)
        for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            ids = list(prompt) + list(completion)
            n = len(ids)
            tokens[row, :n] = ids
            segment_ids[row, :n] = 1
            positions[row, :n] = np.arange(n)
            loss_mask[row, len(prompt):n] = True
            advantage[row, :n] = advantages[row]
            self.counters["tokens"] += n
            self.counters["targets"] += len(completion)
        self.counters["examples"] += len(prompts) // self.options.group_size
        return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions,
                "loss_mask": loss_mask, ADVANTAGE_FIELD: advantage}

    def _metrics(self, scores: np.ndarray, per_reward: np.ndarray, completions) -> dict:
        """TRL's names: the mean reward, its within-group spread, completion lengths."""
        group = self.options.group_size
        grouped = scores.reshape(-1, group)
        stds = grouped.std(1, ddof=1)
        lengths = np.array([len(c) for c in completions])
        ended = np.array([bool(c) and c[-1] in self.stop_ids for c in completions])
        out = {"reward": float(scores.mean()), "reward_std": float(stds.mean()),
               "frac_reward_zero_std": float(np.mean(np.isclose(stds, 0.0))),
               "completions/mean_length": float(lengths.mean()),
               "completions/clipped_ratio": float(1.0 - ended.mean())}
        for index, name in enumerate(self.names):
            out[f"rewards/{name}/mean"] = float(per_reward[:, index].mean())
        return out
