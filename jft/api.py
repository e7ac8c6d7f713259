"""`jft.load`: a model object for notebooks, wrapping the pure functions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jft.errors import JftError
from jft.formats.loading import load_checkpoint
from jft.inference.generation import Sampling, generate_tokens
from jft.models import PARAM_AXES, ModelConfig, forward
from jft.sharding import LogicalRules
from jft.text.tokenizer import Tokenizer


@dataclass
class Model:
    """A loaded model: `config`, `params` and `tokenizer`, plus conveniences."""

    config: ModelConfig
    params: dict[str, Any]
    tokenizer: Tokenizer | None
    source: Path
    adapters: list = field(default_factory=list)  # applied unmerged
    # A continual run's task selector (dynamic ConPET): each prompt is answered by the
    # task adapter it routes to (jft.continual.inference.Router).
    router: Any = None
    # What quantizing the base did (`quantize=`), e.g. a GGUF file's tensors kept or converted.
    quantization: Any = None

    def logits(self, token_ids) -> jax.Array:
        """Logits [B, T, V] for token ids [T] or [B, T]."""
        tokens = jnp.asarray(token_ids, jnp.int32)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if self.router is None:
            return _jit_forward(self.config, self.params, tokens, tuple(self.adapters))
        rows = {}
        for params, adapters, group in self._routes(tokens.tolist()):
            logits = _jit_forward(self.config, params, tokens[jnp.asarray(group)],
                                  tuple(adapters))
            rows |= dict(zip(group, logits, strict=True))
        return jnp.stack([rows[i] for i in range(len(tokens))])

    def generate(
        self,
        prompt: str | Sequence[str],
        max_new_tokens: int = 128,
        chat: bool = False,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> str | list[str]:
        """The completion of `prompt` (or of each prompt in a list), stop tokens excluded."""
        tokenizer = self._require_tokenizer()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = [self.encode_prompt(p, chat) for p in prompts]
        outputs = [None] * len(ids)
        for params, adapters, rows in self._routes(ids):
            generated = generate_tokens(
                self.config, params, [ids[i] for i in rows], max_new_tokens,
                self.stop_ids, Sampling(temperature, top_k, top_p), seed, adapters=adapters,
            )
            for row, out in zip(rows, generated, strict=True):
                outputs[row] = out
        texts = [tokenizer.decode(out) for out in outputs]
        return texts[0] if isinstance(prompt, str) else texts

    def _routes(self, prompts: list[list[int]]) -> list[tuple[dict, list, list[int]]]:
        """(params, adapters, the prompts' rows they answer): all rows with the model's
        own adapters, or each task adapter with the rows the router sends it."""
        if self.router is None:
            return [(self.params, self.adapters, list(range(len(prompts))))]
        routes = self.router.route(self.config, prompts)
        return [(params, adapters, [i for i, r in enumerate(routes) if r == expert])
                for expert, (params, adapters) in enumerate(self.router.experts)
                if expert in routes]

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end a completion: the tokenizer's end-of-turn tokens and the
        config's EOS."""
        stop = set(self._require_tokenizer().stop_ids)
        if self.config.eos_id is not None:
            stop.add(self.config.eos_id)
        return sorted(stop)

    def encode_prompt(self, prompt: str, chat: bool = False) -> list[int]:
        """Prompt ids: plain text with the checkpoint's BOS, or one chat user turn."""
        if not chat:
            return self._require_tokenizer().encode(prompt)
        return self.encode_chat([{"role": "user", "content": prompt}])

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The ids of a conversation rendered by the model's chat template, ready for the
        assistant's turn."""
        tokenizer = self._require_tokenizer()
        if not tokenizer.chat_template:
            raise JftError(f"{self.source}: this model has no chat template; drop --chat")
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        # The template writes BOS itself where the model wants one.
        return tokenizer.encode(text, add_special_tokens=False)

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise JftError(f"{self.source}: no tokenizer files (tokenizer.json or tokenizer.model)")
        return self.tokenizer


@partial(jax.jit, static_argnums=0)
def _jit_forward(config, params, tokens, adapters):
    return forward(config, params, tokens, adapters=adapters)


def load(model: str | Path, dtype: str = "auto", compute_dtype: str = "auto",
         adapter: str | Path | Sequence[str | Path] | None = None,
         rules: LogicalRules | None = None, quantize: str | None = None,
         quantize_block: int = 64, double_quant: bool = True,
         quantize_embeddings: bool = False, loftq=None) -> Model:
    """Loads a bundled name, an HF directory or a `.gguf` file.

    adapter: a `python -m jft.train` run directory, whose latest checkpoint's deltas are
    applied over the base (unmerged), a PEFT adapter directory (adapter_config.json), a
    jft adapter directory (jft_adapter.json, docs/formats.md), or a `python -m
    jft.continual` run (its strategy's adapters; dynamic ConPET's routed per prompt). A
    list of them stacks them in order (composable sparse deltas: a language's and a
    task's SpIEL deltas applied together).

    rules: a mesh and its logical-axis rules (`jft.sharding.make_rules`): the params are
    then sharded over it as they load, each process reading only its devices' slices.

    dtype: the params' dtype; compute_dtype: the activations'. "auto" is float32 on
    CPU (where bfloat16 matmuls are slow) and bfloat16 on GPU and TPU.

    quantize: "nf4", "fp4" or "int8" stores the base's linear weights quantized in blocks
    of `quantize_block` along their inputs, the 4-bit formats' scales quantized again
    (`double_quant`, QLoRA's), and the embedding table too with `quantize_embeddings`
    (docs/quantization.md). A GGUF file's Q8_0 and Q4_0 tensors are then kept as
    stored; `Model.quantization` reports what was kept and what converted, with its error.
    loftq: a LoraConfig with `init: loftq`: its targets are quantized by LoftQ from their
    float weights, and its LoRA adapter comes first in `Model.adapters`.
    """
    from jft.quant.params import component_axes, from_setting

    run_loftq = None
    if quantize is None and isinstance(adapter, str | Path):  # a run: its base, as it trained
        from jft.training.config import base_settings

        settings = base_settings(adapter)
        quantize = settings.get("quantize")
        quantize_block = settings.get("quantize_block", quantize_block)
        double_quant = settings.get("double_quant", double_quant)
        quantize_embeddings = settings.get("quantize_embeddings", quantize_embeddings)
        run_loftq = settings.get("loftq")
    spec = from_setting(quantize, quantize_block, double_quant, quantize_embeddings)
    default = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    dtype = default if dtype == "auto" else dtype
    compute_dtype = default if compute_dtype == "auto" else compute_dtype
    for name, value in (("dtype", dtype), ("compute_dtype", compute_dtype)):
        if value not in ("float32", "bfloat16", "float16"):
            raise JftError(f"{name}={value!r}; valid: auto, float32, bfloat16, float16")
    sharding = None
    if rules is not None:
        def sharding(path, shape):
            axes = PARAM_AXES[path[-1]] if path[-1] in PARAM_AXES else component_axes(path)
            return rules.sharding(axes, shape, "/".join(path))
    # A LoftQ run's base is LoftQ's Q; its adapter comes from the run, not from this load.
    checkpoint = load_checkpoint(model, dtype, sharding, spec, loftq or run_loftq)
    config = checkpoint.config.replace(dtype=compute_dtype)
    params, adapters, router = checkpoint.params, [], None
    if loftq is not None:
        from jft.peft.base import Adapter

        adapters.append(Adapter(checkpoint.loftq_delta, "lora", loftq))
    if isinstance(adapter, list | tuple):  # stacked in order, each over the ones before
        from jft.formats.adapters import load_adapter

        for one in adapter:
            params, loaded = load_adapter(one, params, config, rules)
            adapters += loaded
    elif adapter is not None:
        from jft.continual.inference import is_continual_run, load_continual
        from jft.formats.adapters import load_adapter

        if is_continual_run(adapter):
            params, adapters, router = load_continual(adapter, params, config, rules)
        else:
            params, adapters = load_adapter(adapter, params, config, rules)
    return Model(config, params, checkpoint.tokenizer, checkpoint.source, adapters, router,
                 checkpoint.quantization)

