"""Batched generation: one jit-compiled prefill, then a jit-compiled decode loop.

Prompts of different lengths are left-padded into one batch; padded slots are marked
invalid in the KV cache, so every row attends only to its own tokens. Prompt and
cache lengths are rounded up to buckets, so a new prompt rarely means a new compile,
and the decode loop is a `lax.while_loop` over static shapes: nothing recompiles per
token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jft.models import ModelConfig, forward, init_cache

PROMPT_BUCKET = 32
CACHE_BUCKET = 64


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k 0 and top_p 1.0 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def generate_tokens(
    config: ModelConfig,
    params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    sampling: Sampling = Sampling(),
    seed: int = 0,
    adapters: Sequence = (),
) -> list[list[int]]:
    """New tokens for each prompt, up to (not including) the first stop token.

    adapters: PEFT adapters (`jft.peft.Adapter`) to generate with, unmerged.
    """
    stops = set(int(s) for s in stop_ids)
    out = sample_tokens(config, params, prompts, max_new_tokens, stop_ids, sampling,
                        jax.random.key(seed), adapters)
    return [row[:-1] if row and row[-1] in stops else row for row in out]


def sample_tokens(
    config: ModelConfig,
    params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int],
    sampling: Sampling,
    key: jax.Array,
    adapters: Sequence = (),
    prompt_len: int | None = None,
) -> list[list[int]]:
    """New tokens for each prompt, through the first stop token (included where one was
    generated). `prompt_len` pads the prompts to that many positions at least (a fixed
    length never recompiles)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    prompt_len = _round_up(max(longest, prompt_len or 0), PROMPT_BUCKET)
    virtual = sum(
        p.shape[0] for a in adapters
        if (p := a.impl.prompt_embeddings(a.delta, a.config)) is not None
    )
    cache_len = _round_up(virtual + prompt_len + max_new_tokens, CACHE_BUCKET)
    if cache_len > config.max_position:
        cache_len = max(virtual + prompt_len + max_new_tokens, min(cache_len, config.max_position))

    tokens = np.zeros((len(prompts), prompt_len), np.int32)
    valid = np.zeros((len(prompts), prompt_len), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, prompt_len - len(prompt):] = prompt
        valid[row, prompt_len - len(prompt):] = 1
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)

    out = _generate(
        config, params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid),
        key, cache_len, max_new_tokens,
        tuple(sorted(set(int(s) for s in stop_ids))), sampling, tuple(adapters),
    )
    results = []
    for row in np.asarray(out):
        row = row.tolist()
        results.append(row[: row.index(-1)] if -1 in row else row)
    return results


@partial(jax.jit, static_argnums=(0, 6, 7, 8, 9))
def _generate(config, params, tokens, positions, valid, key, cache_len, max_new, stop_ids,
              sampling, adapters):
    batch = tokens.shape[0]
    cache = init_cache(config, batch, cache_len)
    logits, cache = forward(config, params, tokens, positions, segment_ids=valid, cache=cache,
                            adapters=adapters, with_prompts=True)
    key, step_key = jax.random.split(key)
    first = sample(logits[:, -1], step_key, sampling)
    stops = jnp.asarray(stop_ids or (-1,), jnp.int32)

    def cond(state):
        step, _, _, _, done, _, _ = state
        return (step < max_new) & ~jnp.all(done)

    def body(state):
        step, out, cache, token, done, position, key = state
        out = out.at[:, step].set(jnp.where(done, -1, token))  # the stop token included
        done = done | jnp.isin(token, stops)
        logits, cache = forward(config, params, token[:, None], position[:, None], cache=cache,
                                adapters=adapters, with_prompts=False)
        key, step_key = jax.random.split(key)
        token = sample(logits[:, -1], step_key, sampling)
        return step + 1, out, cache, token, done, position + 1, key

    out = jnp.full((batch, max_new), -1, jnp.int32)
    state = (0, out, cache, first, jnp.zeros(batch, bool), positions[:, -1] + 1, key)
    return jax.lax.while_loop(cond, body, state)[1]


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Next tokens [B] from last-position logits [B, V]."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always the top token).
        drop_sorted = jnp.cumsum(probs, axis=-1) - probs >= sampling.top_p
        drop = jnp.zeros_like(drop_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order
        ].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
