"""The two bundled real models agree with transformers' own GGUF loading (fp32)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import jft
from jft.formats.bundled import bundled_path
from jft.inference.generation import generate_tokens
from jft.text.default_chat_templates import GEMMA

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a café in Zürich, 3 friends",
    "日本の首都は",
]


@pytest.fixture(scope="module", params=["smollm2-135m-instruct", "gemma3-270m"])
def models(request):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = bundled_path(request.param)
    hf_model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if hf_tokenizer.chat_template is None:  # the Gemma GGUF ships none; jft falls back
        hf_tokenizer.chat_template = GEMMA
    ours = jft.load(request.param, dtype="float32", compute_dtype="float32")
    return ours, hf_model, hf_tokenizer


def _hf_greedy(hf_model, ids, new_tokens):
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=0,
        )
    return out[0, len(ids):].tolist()


def test_logits_match_transformers_gguf_loading(models):
    ours, hf_model, hf_tokenizer = models
    for prompt in PROMPTS:
        ids = hf_tokenizer(prompt)["input_ids"]
        assert ours.tokenizer.encode(prompt) == ids
        with torch.no_grad():
            reference = hf_model(torch.tensor([ids])).logits.numpy()
        np.testing.assert_allclose(np.asarray(ours.logits(ids)), reference, atol=1e-3, rtol=0)


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_greedy_20_tokens_match_transformers(models, chat):
    ours, hf_model, hf_tokenizer = models
    for prompt in ["Write a haiku about the sea." if chat else "The capital of France is"]:
        if chat:
            messages = [{"role": "user", "content": prompt}]
            ids = hf_tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        else:
            ids = hf_tokenizer(prompt)["input_ids"]
        assert ours.encode_prompt(prompt, chat=chat) == list(ids)
        generated = generate_tokens(ours.config, ours.params, [ids], max_new_tokens=20)[0]
        assert generated == _hf_greedy(hf_model, list(ids), 20)


def test_generate_cli_answers_the_capital_of_france():
    out = subprocess.run(
        [sys.executable, "-m", "jft.generate", "--model", "smollm2-135m-instruct", "--chat",
         "--prompt", "What is the capital of France?"],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout == "The capital of France is Paris.\n"


def test_peft_export_names_the_hub_id_and_loads_over_the_gguf_base_offline(tmp_path):
    """docs/export.md's recipe: PEFT over transformers' GGUF loading, with no hub access."""
    import json
    import os

    import jax
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jft.formats.jft_adapter import save_jft_adapter
    from jft.peft import Adapter, create

    name = "smollm2-135m-instruct"
    model = jft.load(name, dtype="float32", compute_dtype="float32")
    _, adapter = create("lora", jax.random.key(0), model.params, model.config, r=4,
                        targets=["q_proj", "down_proj"])
    delta = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape),
                         adapter.delta)  # B is zero at init: make the adapter visible
    (tmp_path / "jft").mkdir()
    save_jft_adapter(Adapter(delta, "lora", adapter.config), model.config, tmp_path / "jft",
                     name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "jft.export", "--model", name, "--adapter",
                    str(tmp_path / "jft"), "--out", str(tmp_path / "peft"), "--format", "peft"],
                   check=True, capture_output=True, env=env)
    config = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"

    path = bundled_path(name)
    base = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32)
    hf = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    ours = jft.load(name, dtype="float32", compute_dtype="float32", adapter=tmp_path / "jft")
    ids = ours.tokenizer.encode(PROMPTS[0])
    with torch.no_grad():
        reference = hf(torch.tensor([ids])).logits.numpy()
    assert np.abs(reference - np.asarray(model.logits(ids))).max() > 0.01  # the adapter acts
    np.testing.assert_allclose(np.asarray(ours.logits(ids)), reference, atol=1e-3, rtol=0)
