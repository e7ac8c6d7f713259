"""The task selector of dynamic ConPET: which task's adapter should answer a prompt.

In dynamic ConPET (Song et al. 2023) every task trains its own adapter, and a selector,
a classifier over task ids trained with cross-entropy, routes each input to one of them.
Ours is a linear softmax classifier over features of the prompt computed by the frozen
base model: the mean over the prompt's tokens of the final hidden states. ConPET's
selector also tunes a LoRA of its own; we drop it, because the frozen features suffice
when tasks differ in their prompts (their instructions, formats or domains), and a
selector without an adapter costs one forward pass of the base and a few KB on disk.

    features = prompt_features(model, params, prompts)      # [N, D]
    selector = fit_selector(features, task_ids, num_tasks)
    selector.save("selector.safetensors")
    task = selector.predict(prompt_features(model, params, [new_prompt]))[0]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors import SafetensorError, safe_open

from jft.errors import JftError
from jft.models import ModelConfig
from jft.storage import save_safetensors

FORMAT = "jft-selector"
FORMAT_VERSION = 1
_TENSORS = ("mean", "scale", "weights", "bias")


# ------------------------------------------------------------------ prompt features


def prompt_features(model: ModelConfig, params, prompts: Sequence[Sequence[int]],
                    batch_size: int = 16) -> np.ndarray:
    """Features [N, D] float32 of N prompts (token-id lists): the mean over each prompt's
    tokens of the base model's final hidden states (after the final norm), batched as
    `jft.select.features.embeddings` batches, so a prompt's features do not depend on
    what it was batched with."""
    from jft.select.features import embeddings
    from jft.training.data import TokenizedExample, TokenizedExamples

    if batch_size < 1:
        raise JftError(f"batch_size must be at least 1, got {batch_size}")
    prompts = [list(p) for p in prompts]
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise JftError(f"prompt {i} is empty; a prompt needs at least one token")
        if min(prompt) < 0 or max(prompt) >= model.vocab_size:
            raise JftError(f"prompt {i} has token ids outside 0..{model.vocab_size - 1}")
    examples = TokenizedExamples.from_examples(TokenizedExample(p, [False] * len(p))
                                               for p in prompts)
    return embeddings(model, params, (), examples, batch_size=batch_size)


# ------------------------------------------------------------------ the classifier


@dataclass(frozen=True, eq=False)  # eq=False: `==` on numpy fields has no single truth value
class Selector:
    """A linear softmax classifier over standardised features: logits [N, K] =
    ((features - mean) / scale) @ weights + bias."""

    mean: np.ndarray  # [D]
    scale: np.ndarray  # [D]: the training features' std, 1 where that is 0
    weights: np.ndarray  # [D, K]
    bias: np.ndarray  # [K]

    @property
    def num_tasks(self) -> int:
        return self.weights.shape[1]

    @property
    def feature_dim(self) -> int:
        return self.weights.shape[0]

    def logits(self, features) -> np.ndarray:
        """Logits [N, K] float32 for features [N, D]."""
        features = np.asarray(features, np.float32)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise JftError(f"features of shape {features.shape}; this selector was fit on "
                           f"[N, {self.feature_dim}] features (from another base model?)")
        return ((features - self.mean) / self.scale) @ self.weights + self.bias

    def predict(self, features) -> np.ndarray:
        """The task id [N] (int) whose adapter should answer each prompt."""
        return np.argmax(self.logits(features), axis=1)

    def accuracy(self, features, labels) -> float:
        """The fraction of `features` whose predicted task is `labels`."""
        labels = np.asarray(labels)
        if labels.shape != (len(features),):
            raise JftError(f"labels of shape {labels.shape} for {len(features)} features")
        return float(np.mean(self.predict(features) == labels))

    def save(self, path: str | os.PathLike) -> None:
        """Writes one `.safetensors` file: the four arrays, the task count in its metadata."""
        save_safetensors({name: np.ascontiguousarray(getattr(self, name), np.float32)
                          for name in _TENSORS}, Path(path),
                         metadata={"format": FORMAT, "version": str(FORMAT_VERSION),
                                   "num_tasks": str(self.num_tasks)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Selector:
        """A selector written by `save`; JftError naming `path` if it is missing or is not
        one."""
        path = Path(path)
        try:
            with safe_open(path, framework="numpy") as file:
                metadata = file.metadata() or {}
                tensors = {name: file.get_tensor(name) for name in file.keys()}
        except (OSError, SafetensorError) as error:
            raise JftError(f"{path}: cannot read a selector ({error})") from None
        if metadata.get("format") != FORMAT or metadata.get("version") != str(FORMAT_VERSION):
            raise JftError(f"{path}: not a jft selector file (format {metadata.get('format')!r}, "
                           f"version {metadata.get('version')!r}; expected {FORMAT!r}, "
                           f"version {FORMAT_VERSION})")
        missing = [name for name in _TENSORS if name not in tensors]
        if missing:
            raise JftError(f"{path}: selector file lacks tensors {missing}")
        selector = cls(**{name: tensors[name].astype(np.float32) for name in _TENSORS})
        dim, tasks = selector.weights.shape if selector.weights.ndim == 2 else (-1, -1)
        if (metadata.get("num_tasks") != str(tasks) or selector.mean.shape != (dim,)
                or selector.scale.shape != (dim,) or selector.bias.shape != (tasks,)
                or not np.all(selector.scale > 0)):
            raise JftError(
                f"{path}: corrupt selector (num_tasks {metadata.get('num_tasks')!r}, shapes "
                + ", ".join(f"{n} {tensors[n].shape}" for n in _TENSORS)
                + "; expected mean and scale [D], weights [D, K], bias [K], scale > 0)")
        return selector


def fit_selector(features, labels, num_tasks: int, *, steps: int = 300,
                 learning_rate: float = 0.1, l2: float = 1e-3, seed: int = 0) -> Selector:
    """A selector fit to `features` [N, D] and task ids `labels` [N] in 0..num_tasks-1.

    The features are standardised (by their mean and std), then the weights minimise
    the mean softmax cross-entropy + l2/2 * ||weights||^2 (the bias is not penalised):
    full-batch multinomial logistic regression, `steps` steps of Adam. Tasks that no
    label names still get a column (whose logit the training drives down).
    The objective is convex: `seed` (the small random initial weights) changes the
    path, not the optimum.
    """
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels)
    if features.ndim != 2 or len(features) == 0:
        raise JftError(f"features must be [N, D] with N >= 1, got shape {features.shape}")
    if labels.shape != (len(features),) or not np.issubdtype(labels.dtype, np.integer):
        raise JftError(f"labels must be {len(features)} integer task ids, got "
                       f"{labels.dtype} of shape {labels.shape}")
    if num_tasks < 1:
        raise JftError(f"num_tasks must be at least 1, got {num_tasks}")
    if labels.min() < 0 or labels.max() >= num_tasks:
        raise JftError(f"labels must be task ids in 0..{num_tasks - 1}, got "
                       f"{labels.min()}..{labels.max()}")
    if not np.all(np.isfinite(features)):
        raise JftError("features contain NaN or infinity")
    # In float64: a constant feature then has a std of exactly 0.
    mean = features.mean(axis=0, dtype=np.float64)
    std = features.std(axis=0, dtype=np.float64)
    scale = np.where(std > 0, std, 1.0).astype(np.float32)
    x = (features - mean.astype(np.float32)) / scale  # [N, D]
    w0 = 0.01 * jax.random.normal(jax.random.key(seed), (x.shape[1], num_tasks))
    weights, bias = _fit(x, labels.astype(np.int32), w0, learning_rate, l2, steps)
    return Selector(mean.astype(np.float32), scale, np.asarray(weights, np.float32),
                    np.asarray(bias, np.float32))


def objective(x, labels, weights, bias, l2) -> jax.Array:
    """Mean softmax cross-entropy of standardised features x [N, D] + l2/2 * ||weights||^2."""
    logits = x @ weights + bias  # [N, K]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss + 0.5 * l2 * jnp.sum(weights**2)


@jax.jit
def _fit(x, labels, w0, learning_rate, l2, steps) -> tuple[jax.Array, jax.Array]:
    """(weights [D, K], bias [K]) after `steps` full-batch Adam steps from (w0, 0)."""
    optimizer = optax.adam(learning_rate)
    grad = jax.grad(lambda p: objective(x, labels, p[0], p[1], l2))

    def step(_, carry):
        params, opt_state = carry
        updates, opt_state = optimizer.update(grad(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = (w0, jnp.zeros(w0.shape[1]))
    params, _ = jax.lax.fori_loop(0, steps, step, (params, optimizer.init(params)))
    return params
