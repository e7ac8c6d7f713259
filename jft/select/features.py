"""Per-example quantities of a pool, computed batched and jitted: the loss of each
example's targets, the model's predictive entropy over them, and embeddings.

Examples are batched one per row, sorted by length so that a batch pads little, padded
to a multiple of LENGTH_BUCKET tokens and to `batch_size` rows: the jitted functions
compile once per length bucket, and an example's values never depend on its neighbours
(padding is segment 0, which no real token attends to). Only the [N] or [N, D] results
are kept; a progress bar runs on a terminal.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jft.models import ModelConfig, forward, output_logits
from jft.objectives.sft import token_losses
from jft.training.data import TokenizedExamples

LENGTH_BUCKET = 16


def example_batches(examples: TokenizedExamples, batch_size: int, desc: str | None = None
                    ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """(the rows' example indices, a batch of `batch_size` rows) over all examples."""
    from tqdm.auto import tqdm

    order = np.argsort(examples.lengths, kind="stable")
    bar = tqdm(total=len(order), desc=desc, unit="ex", file=sys.stderr, leave=False,
               disable=None if desc else True)
    try:
        for first in range(0, len(order), batch_size):
            rows = order[first:first + batch_size]
            length = LENGTH_BUCKET * math.ceil(max(examples.lengths[rows]) / LENGTH_BUCKET)
            yield rows, pad_rows(examples, rows, batch_size, length)
            bar.update(len(rows))
    finally:
        bar.close()


def pad_rows(examples: TokenizedExamples, rows, batch_size: int, length: int) -> dict:
    tokens = np.zeros((batch_size, length), np.int32)
    segment_ids = np.zeros((batch_size, length), np.int32)
    loss_mask = np.zeros((batch_size, length), bool)
    for row, index in enumerate(rows):
        ids, mask = examples.arrays(int(index))
        tokens[row, :len(ids)] = ids
        segment_ids[row, :len(ids)] = 1
        loss_mask[row, :len(ids)] = mask
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch_size, length))
    return {"tokens": tokens, "segment_ids": segment_ids, "loss_mask": loss_mask,
            "positions": np.array(positions)}


def target_losses(model: ModelConfig, params, adapters, examples: TokenizedExamples, *,
                  batch_size: int = 16, desc: str | None = None) -> np.ndarray:
    """Mean cross-entropy [N] of each example's target tokens (NaN where it has none)."""
    out = np.full(len(examples), np.nan, np.float64)
    for rows, batch in example_batches(examples, batch_size, desc):
        total, count = _loss_sums(model, params, tuple(adapters), batch)
        total, count = np.asarray(total)[:len(rows)], np.asarray(count)[:len(rows)]
        out[rows] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return out


def target_uncertainty(model: ModelConfig, params, adapters, examples: TokenizedExamples, *,
                       batch_size: int = 16, samples: int = 1, seed: int = 0,
                       desc: str | None = None) -> dict[str, np.ndarray]:
    """{"nll": mean cross-entropy, "entropy": mean predictive entropy} [N] over each
    example's target tokens. With `samples` > 1 the adapters' dropout stays on and the
    values are averaged over that many passes (Monte-Carlo dropout)."""
    nll = np.full(len(examples), np.nan, np.float64)
    entropy = np.full(len(examples), np.nan, np.float64)
    key = jax.random.key(seed)
    for rows, batch in example_batches(examples, batch_size, desc):
        sums = np.zeros((2, batch_size))
        for sample in range(samples):
            rng = None if samples == 1 else jax.random.fold_in(key, sample)
            total, spread, count = _uncertainty_sums(model, params, tuple(adapters), batch, rng)
            sums += np.stack([np.asarray(total), np.asarray(spread)])
        count = np.maximum(np.asarray(count), 1)
        nll[rows] = (sums[0] / samples / count)[:len(rows)]
        entropy[rows] = (sums[1] / samples / count)[:len(rows)]
    return {"nll": nll, "entropy": entropy}


def embeddings(model: ModelConfig, params, adapters, examples: TokenizedExamples, *,
               batch_size: int = 16, desc: str | None = None) -> np.ndarray:
    """[N, D] float32: the mean of each example's final hidden states (after the final
    norm) over all its tokens."""
    out = np.zeros((len(examples), model.embed_dim), np.float32)
    for rows, batch in example_batches(examples, batch_size, desc):
        out[rows] = np.asarray(_mean_hidden(model, params, tuple(adapters), batch))[:len(rows)]
    return out


@partial(jax.jit, static_argnums=0)
def _loss_sums(model, params, adapters, batch):
    losses, mask = token_losses(model, params, adapters, batch)
    return jnp.sum(jnp.where(mask, losses, 0.0), axis=1), mask.sum(axis=1)


@partial(jax.jit, static_argnums=0)
def _uncertainty_sums(model, params, adapters, batch, rng):
    hidden, head = forward(model, params, batch["tokens"], batch["positions"],
                           batch["segment_ids"], adapters=adapters, rng=rng,
                           return_hidden=True)
    logp = jax.nn.log_softmax(output_logits(model, hidden[:, :-1], head), axis=-1)  # [B,T,V]
    targets = batch["tokens"][:, 1:]
    mask = batch["loss_mask"][:, 1:] & (batch["segment_ids"][:, 1:] != 0)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return (jnp.sum(jnp.where(mask, nll, 0.0), 1), jnp.sum(jnp.where(mask, entropy, 0.0), 1),
            mask.sum(1))


@partial(jax.jit, static_argnums=0)
def _mean_hidden(model, params, adapters, batch):
    hidden, _ = forward(model, params, batch["tokens"], batch["positions"],
                        batch["segment_ids"], adapters=adapters, return_hidden=True)
    real = (batch["segment_ids"] != 0).astype(jnp.float32)  # [B, T]
    total = jnp.einsum("BTD,BT->BD", hidden.astype(jnp.float32), real)
    return total / jnp.maximum(real.sum(axis=1), 1.0)[:, None]


def generated_examples(model: ModelConfig, params, adapters, prompts: TokenizedExamples,
                       stop_ids, *, max_new_tokens: int, batch_size: int = 16,
                       desc: str | None = None) -> TokenizedExamples:
    """Each prompt followed by the model's greedy completion and EOS, the completion (and
    EOS) as targets: what the model would answer, to score like a labelled example."""
    from jft.inference.generation import generate_tokens
    from jft.training.data import TokenizedExample

    eos = min(stop_ids)
    done: dict[int, TokenizedExample] = {}
    for rows, _ in example_batches(prompts, batch_size, desc):
        inputs = [prompts.arrays(int(i))[0].tolist() for i in rows]
        outputs = generate_tokens(model, params, inputs, max_new_tokens, stop_ids,
                                  adapters=tuple(adapters))
        for index, prompt, output in zip(rows, inputs, outputs, strict=True):
            answer = [*output, eos]
            done[int(index)] = TokenizedExample(prompt + answer,
                                                [False] * len(prompt) + [True] * len(answer))
    return TokenizedExamples.from_examples(done[i] for i in range(len(prompts)))
