"""The serving engine without HTTP: continuous batching over rows with different adapters
gives each request what `generate_tokens` gives it alone; per-row sampling filters match
their definition; incremental text with stop strings."""

from __future__ import annotations

import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jft.errors import JftError
from jft.inference.generation import generate_tokens
from jft.peft import Adapter, create, get_method
from jft.serve import batch
from jft.serve.adapters import DeviceAdapters, prepare
from jft.serve.engine import Engine, EngineSettings, Request, TextStream
from jft.serve.metrics import Metrics

STOP = 2


def perturbed(method: str, base, model, seed: int, scale: float = 0.3, split=False,
              **options) -> Adapter:
    """A fresh adapter with random values in every trainable leaf, so that it changes the
    model's output (a fresh LoRA or IA3 adapter is the identity)."""
    _, adapter = create(method, jax.random.key(seed), base, model, **options)
    if split:
        delta, config = adapter.impl.split(adapter.delta, model, adapter.config)
        adapter = Adapter(delta, method, config)
    keys = iter(jax.random.split(jax.random.key(100 + seed), 64))
    delta = jax.tree.map(
        lambda leaf, train: leaf + scale * jax.random.normal(next(keys), leaf.shape, leaf.dtype)
        if train else leaf, adapter.delta, adapter.trainable())
    return adapter.with_delta(delta)


@pytest.fixture(scope="module")
def adapters(llama):
    _, model, params = llama
    return {
        "lora8": perturbed("lora", params, model, 1, r=8, alpha=16, targets="all-linear"),
        "lora2": perturbed("lora", params, model, 2, r=2, alpha=4, rslora=True,
                           targets=["q_proj", "v_proj"], rank_pattern={"q_proj": 1}),
        "pissa": perturbed("lora", params, model, 3, r=2, alpha=2, init="pissa",
                           targets=["o_proj"]),
        "dora": perturbed("lora", params, model, 4, r=4, alpha=4, dora=True, scale=0.1),
        "ia3": perturbed("ia3", params, model, 5),
        "spiel": perturbed("spiel", params, model, 6, scale=0.05, density=0.05),
        "s2ft": perturbed("s2ft", params, model, 7, scale=0.05, split=True,
                          attention_ratio=0.25, mlp_ratio=0.1),
    }


def _serve(model, params, adapters, names, prompts, settings, max_tokens=10, **sampling):
    """Every (adapter name, prompt) submitted at once; each request's generated ids."""
    metrics = Metrics()
    device = DeviceAdapters(model, settings.max_adapters_on_device, settings.max_lora_rank,
                            jnp.float32, metrics)
    device.allocate_lora_bank()
    host = {n: prepare(n, Path(n), a.method, a.config, a.delta, params, model,
                       settings.max_lora_rank) for n, a in adapters.items()}
    engine = Engine(model, params, _IdsTokenizer(), device, settings, metrics)
    engine.start()
    outputs, done = {}, []
    for i, (name, prompt) in enumerate(zip(names, prompts, strict=True)):
        finished = threading.Event()
        done.append(finished)
        outputs[i] = {"text": ""}

        def emit(output, i=i, finished=finished):
            outputs[i]["text"] += output.text
            if output.finish_reason:
                outputs[i]["reason"] = output.finish_reason
                finished.set()

        engine.submit(Request(prompt, max_tokens, emit, host.get(name),
                              stop_ids=frozenset([STOP]), **sampling))
    try:
        assert all(event.wait(300) for event in done)
    finally:
        engine.stop()
    return [[int(t) for t in outputs[i]["text"].split()] for i in range(len(prompts))], metrics


class _IdsTokenizer:
    """Text = the ids joined by spaces, so the engine's text is the ids it generated."""

    def decode(self, ids):
        return "".join(f"{i} " for i in ids)


def test_mixed_batch_equals_each_request_alone(llama, adapters):
    """Fourteen requests over seven adapters of five methods (the LoRA bank and the rowwise
    banks) and the base, three decode rows and three device entries, so requests queue,
    join and leave the batch between steps and adapters are evicted and reloaded."""
    _, model, params = llama
    rng = np.random.default_rng(0)
    names = [None, "lora8", "lora2", "pissa", "dora", "ia3", "spiel", "s2ft",
             "lora8", "ia3", None, "lora2", "s2ft", "dora"]
    prompts = [[int(t) for t in rng.integers(3, 150, size=int(rng.integers(2, 40)))]
               for _ in names]
    settings = EngineSettings(max_batch=3, max_len=128, max_adapters_on_device=3,
                              max_lora_rank=8, prefill_rows=2)
    got, metrics = _serve(model, params, adapters, names, prompts, settings)
    for name, prompt, tokens in zip(names, prompts, got, strict=True):
        chosen = [adapters[name]] if name else []
        base = chosen[0].impl.rebase(params, chosen[0].delta, model, chosen[0].config) \
            if chosen else params
        assert tokens == generate_tokens(model, base, [prompt], 10, [STOP],
                                         adapters=chosen)[0], name
    sample = {m.name: m for m in metrics.registry.collect()}
    assert sample["jft_adapter_evictions"].samples[0].value > 0


def test_seeded_sampling_depends_on_the_request_only(llama, adapters):
    """A seeded request samples the same tokens alone or beside others."""
    _, model, params = llama
    settings = EngineSettings(max_batch=4, max_len=64, max_adapters_on_device=2,
                              max_lora_rank=8)
    prompt = [5, 17, 33, 4]
    options = dict(temperature=0.9, top_p=0.8, top_k=20, seed=7)
    alone, _ = _serve(model, params, adapters, ["lora8"], [prompt], settings, **options)
    crowd, _ = _serve(model, params, adapters, [None, "lora8", "ia3", "lora8"],
                      [[9, 9], prompt, [3, 4, 5], [6]], settings, **options)
    assert crowd[1] == alone[0]
    assert crowd[3] != alone[0]  # another prompt: not a constant


def test_row_filters_match_their_definition():
    """top-k keeps the k largest logits; top-p the smallest prefix of the sorted
    distribution whose mass reaches p; each row with its own settings."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 12)).astype(np.float32)
    top_p = np.asarray([1.0, 0.5, 0.9], np.float32)
    top_k = np.asarray([3, 0, 5], np.int32)
    got = np.asarray(batch._filter(jnp.asarray(logits), jnp.asarray(top_p), jnp.asarray(top_k)))
    for row in range(3):
        order = np.argsort(-logits[row])
        probs = np.exp(logits[row][order] - logits[row].max())
        probs /= probs.sum()
        keep = np.cumsum(probs) - probs < top_p[row]
        if top_k[row]:
            keep &= np.arange(12) < top_k[row]
        expected = np.full(12, -np.inf, np.float32)
        expected[order[keep]] = logits[row][order[keep]]
        np.testing.assert_array_equal(got[row], expected)


class _WordTokenizer:
    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_text_stream_holds_back_stop_strings_and_partial_characters():
    stream = TextStream(_WordTokenizer(["Hel", "lo", " EN", "D", "x", "\ufffd"]), ("END",))
    pieces = [stream.push(i) for i in (0, 1, 2)]
    assert "".join(p for p, _ in pieces) == "Hello "  # "EN" may begin "END": held
    assert stream.push(3) == ("", True)  # "END" reached: the output stops before it
    stream = TextStream(_WordTokenizer(["a", "\ufffd"]), ())
    assert stream.push(0) == ("a", False)
    assert stream.push(1) == ("", False)  # an incomplete character waits for its bytes
    assert stream.finish() == "\ufffd"


def test_unservable_adapters_are_refused(llama):
    _, model, params = llama
    _, prompt = create("prompt_tuning", jax.random.key(0), params, model, num_virtual_tokens=2)
    with pytest.raises(JftError, match="merged model"):
        prepare("p", Path("p"), prompt.method, prompt.config, prompt.delta, params, model, 8)
    lora = perturbed("lora", params, model, 1, r=8, targets="all-linear")
    with pytest.raises(JftError, match="--max-lora-rank 8"):
        prepare("big", Path("big"), lora.method, lora.config, lora.delta, params, model, 4)


def test_per_row_cache_index_decodes_like_a_shared_one(llama):
    """models.forward with one write index per row: rows of different lengths, each
    prefilled alone at slot 0, decode together to the logits of each row alone."""
    from jft.models import forward, init_cache

    _, model, params = llama
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    cache = batch.empty_cache(model, 2, 16)
    singles = []
    for row, prompt in enumerate(prompts):
        _, one = forward(model, params, [prompt], cache=init_cache(model, 1, 16))
        cache = batch.insert(cache, one["k"], one["v"], np.asarray([row], np.int32),
                             np.asarray([len(prompt)], np.int32))
        singles.append(one)
    logits, _ = forward(model, params, [[3], [4]], cache=cache)
    for row, (one, token) in enumerate(zip(singles, (3, 4), strict=True)):
        alone, _ = forward(model, params, [[token]], cache=one)
        np.testing.assert_allclose(logits[row], alone[0], rtol=1e-5, atol=1e-5)


def test_lora_bank_entry_of_a_rewritten_base_is_its_lora_over_the_original(llama, adapters):
    """PiSSA's adapter over W - s A0 B0 equals the rank-2r bank entry over W."""
    _, model, params = llama
    pissa = adapters["pissa"]
    entry = batch.lora_host_entry(model, pissa)
    assert batch.lora_entry_rank(entry) == 4
    merged = get_method("lora").merge(
        pissa.impl.rebase(params, pissa.delta, model, pissa.config), pissa.delta, model,
        pissa.config)
    o = entry["o_proj"]
    site_in, site_out = o["a"].shape[1], o["b"].shape[2]
    base = np.asarray(params["layers"]["o_proj"], np.float32).reshape(-1, site_in, site_out)
    expected = base + o["scales"][:, None, None] * (o["a"] @ o["b"])
    np.testing.assert_allclose(np.asarray(merged["layers"]["o_proj"]).reshape(expected.shape),
                               expected, rtol=1e-5, atol=1e-5)


def test_decode_through_the_gathered_lora_kernel(llama, adapters):
    """`kernels: pallas`: the decode step's LoRA deltas come from the BGMV kernel (in
    interpret mode here) and the tokens are those of each request alone."""
    _, model, params = llama
    model = model.replace(kernels="pallas")
    names = ["lora8", None, "lora2", "lora8"]
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    settings = EngineSettings(max_batch=4, max_len=64, max_adapters_on_device=2,
                              max_lora_rank=8)
    got, _ = _serve(model, params, {n: adapters[n] for n in ("lora8", "lora2")}, names,
                    prompts, settings, max_tokens=4)
    for name, prompt, tokens in zip(names, prompts, got, strict=True):
        chosen = [adapters[name]] if name else []
        assert tokens == generate_tokens(model.replace(kernels="xla"), params, [prompt], 4,
                                         [STOP], adapters=chosen)[0], name
