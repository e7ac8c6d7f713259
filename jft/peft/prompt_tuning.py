"""Prompt tuning: P learned virtual-token embeddings prepended to every input.

The delta is `{"embedding": [P, D]}` (PEFT's `prompt_encoder.embedding.weight`, which
PEFT saves as `prompt_embeddings`). The forward pass prepends these rows to the token
embeddings, positions run 0..P-1 over them and on after them, and their logits are
dropped (PEFT's causal-LM forward returns logits for them too: [B, P + T, V]).

Inits, as PEFT's `PromptTuningInit`:
- `random`: normal(0, 1), torch.nn.Embedding's init;
- `text`: the embeddings of `init_token_ids` (PEFT tokenizes `prompt_tuning_init_text`
  with special tokens, e.g. Llama's BOS first; `text_token_ids` does the same), truncated
  to P or repeated until P long;
- `sample_vocab`: the embeddings of P token ids drawn uniformly from the vocabulary.

The embeddings the text inits copy are the model's input embeddings as a real token
enters the first layer, i.e. scaled by sqrt(D) on Gemma (transformers applies that
scale inside its embedding module, so PEFT's `word_embeddings(ids)` includes it).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jft.errors import JftError
from jft.peft.base import MethodBase, register

INITS = ("random", "text", "sample_vocab")


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig:
    num_virtual_tokens: int = 20
    init: str = "random"
    # Token ids of the init text (with the tokenizer's special tokens, as PEFT has them).
    init_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not isinstance(self.init_token_ids, tuple):
            object.__setattr__(self, "init_token_ids", tuple(int(i) for i in self.init_token_ids))
        if self.num_virtual_tokens < 1:
            raise JftError("prompt tuning num_virtual_tokens must be a positive integer, "
                           f"got {self.num_virtual_tokens}")
        if self.init not in INITS:
            raise JftError(f"unknown prompt tuning init {self.init!r}; valid: {', '.join(INITS)}")
        if self.init == "text" and not self.init_token_ids:
            raise JftError("prompt tuning init 'text' needs init_token_ids (see text_token_ids)")
        if self.init != "text" and self.init_token_ids:
            raise JftError(f"prompt tuning init_token_ids is only used by init 'text', "
                           f"not {self.init!r}")

    @classmethod
    def from_text(cls, tokenizer, text: str, num_virtual_tokens: int = 20) -> PromptTuningConfig:
        """A `text` init from a jft (or transformers) tokenizer, as PEFT tokenizes it."""
        return cls(num_virtual_tokens, "text", tuple(text_token_ids(tokenizer, text)))


def text_token_ids(tokenizer, text: str) -> list[int]:
    """`text` tokenized the way PEFT's TEXT init does: `tokenizer(text)["input_ids"]`,
    special tokens included."""
    if hasattr(tokenizer, "encode"):
        return list(tokenizer.encode(text, add_special_tokens=True))
    return list(tokenizer(text)["input_ids"])


def virtual_token_ids(token_ids, num_virtual_tokens: int) -> list[int]:
    """PEFT's TEXT init: the ids truncated to P, or repeated until at least P, then cut."""
    ids = list(token_ids)
    if not ids:
        raise JftError("prompt tuning init 'text' needs at least one token id")
    ids = ids * math.ceil(num_virtual_tokens / len(ids))
    return ids[:num_virtual_tokens]


def _input_embeddings(base: dict, model, ids) -> jax.Array:
    vocab = base["embed"].shape[0]
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise JftError(f"prompt tuning init_token_ids has {bad[:5]}; the vocabulary has "
                       f"ids 0..{vocab - 1}")
    rows = jnp.take(base["embed"], jnp.asarray(ids, jnp.int32), axis=0)
    if model.embed_scale:  # as transformers' scaled embedding: scale rounded to the dtype
        dtype = base["embed"].dtype
        rows = rows * jnp.asarray(model.embed_dim**0.5, dtype)
    return rows.astype(jnp.float32)


class PromptTuning(MethodBase):
    name = "prompt_tuning"
    Config = PromptTuningConfig

    def init(self, key, base, model, config, calibration_batches=None):
        p = config.num_virtual_tokens
        if config.init == "text":
            ids = virtual_token_ids(config.init_token_ids, p)
            embedding = _input_embeddings(base, model, ids)
        elif config.init == "sample_vocab":
            ids = np.asarray(jax.random.randint(key, (p,), 0, base["embed"].shape[0]))
            embedding = _input_embeddings(base, model, [int(i) for i in ids])
        else:
            embedding = jax.random.normal(key, (p, model.embed_dim), jnp.float32)
        return {"embedding": embedding}

    def prompt_embeddings(self, delta, config):
        return delta["embedding"]

    def merge(self, base, delta, model, config):
        raise JftError("prompt tuning cannot be merged into the weights: its virtual tokens "
                       "are inputs, so keep the adapter and prepend them at inference")

    def num_params(self, delta, model, config):
        return config.num_virtual_tokens * model.embed_dim

    def delta_axes(self, delta, model, config):
        return {"embedding": (None, "embed")}  # rows prepended to the token embeddings


def to_peft(delta) -> dict[str, np.ndarray]:
    """The tensors PEFT's adapter_model.safetensors holds: `prompt_embeddings` [P, D]."""
    return {"prompt_embeddings": np.asarray(delta["embedding"], np.float32)}


def from_peft(tensors, model, config: PromptTuningConfig):
    """A delta from PEFT's saved `prompt_embeddings` [P, D]."""
    embedding = np.asarray(tensors["prompt_embeddings"], np.float32)
    expected = (config.num_virtual_tokens, model.embed_dim)
    if embedding.shape != expected:
        raise JftError(f"prompt_embeddings has shape {embedding.shape}; expected {expected} "
                       "(num_virtual_tokens, hidden size)")
    return {"embedding": jnp.asarray(embedding)}


PROMPT_TUNING = register(PromptTuning())
