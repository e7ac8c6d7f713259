"""PEFT adapter directories: jft adapters load in PEFT, PEFT's adapters load in jft, both
with the same logits, and mismatched or unsupported adapters are refused by name."""

from __future__ import annotations

import copy
import json

import jax
import numpy as np
import pytest
import torch

import jft
from jft.errors import JftError
from jft.formats.adapters import load_adapter
from jft.formats.peft_adapter import is_peft_adapter, save_peft_adapter
from jft.models import forward
from jft.peft import Adapter, create, get_method, ia3, lora
from jft.peft.prefix_tuning import bake
from tests.hf_reference import VOCAB, hf_logits, save_hf_model

TOKENS = np.random.default_rng(0).integers(3, VOCAB, size=(2, 7))
_logits = jax.jit(forward, static_argnums=0)

JFT_CASES = {
    "lora": dict(r=4, alpha=8.0, targets=("q_proj", "v_proj")),
    "rslora_patterns": dict(r=4, alpha=6.0, rslora=True, targets=["q_proj", "o_proj", "down_proj"],
        layers_to_transform=[0, 2], rank_pattern={"down_proj": 2},
        alpha_pattern={"model.layers.2.self_attn.q_proj": 3.0}),
    "dora": dict(r=4, alpha=8.0, dora=True, targets=("q_proj", "o_proj", "down_proj")),
    "pissa": dict(r=4, alpha=8.0, init="pissa", targets=("q_proj", "up_proj"),
                  rank_pattern={"up_proj": 2}),
    "ia3": dict(targets=["k_proj", "o_proj", "down_proj"], layers_to_transform=[1, 2],
                feedforward=["o_proj", "down_proj"]),
    "prompt_tuning": dict(num_virtual_tokens=3),
    "prefix_tuning": dict(num_virtual_tokens=3, projection=True),
}


def _method(case):
    return case if case in ("ia3", "prompt_tuning", "prefix_tuning") else "lora"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(HF model, its directory, the jft model loaded from it in fp32)."""
    directory = tmp_path_factory.mktemp("llama")
    hf_model = save_hf_model("llama", directory)
    return hf_model, directory, jft.load(directory, dtype="float32", compute_dtype="float32")


def _trained(case, loaded):
    """(the base it applies to, a jft adapter whose trainable leaves moved off their init
    where training reaches them: not a LoRA's rank padding nor untargeted layers)."""
    method = _method(case)
    base, adapter = create(method, jax.random.key(0), loaded.params, loaded.config,
                           **JFT_CASES[case])
    rng = np.random.default_rng(1)
    mask = get_method(method).trainable(adapter.delta, adapter.config)
    delta = jax.tree.map(lambda x, m: np.array(x + 0.3 * rng.standard_normal(x.shape) * m),
                         adapter.delta, mask)
    if method == "lora":
        for module, p in lora.plan(loaded.config, adapter.config).items():
            entry, rank_mask = delta["layers"][module], p.rank_mask()
            entry["a"] *= rank_mask.reshape(len(rank_mask), *[1] * (entry["a"].ndim - 2), -1)
            entry["b"] *= rank_mask.reshape(*rank_mask.shape, *[1] * (entry["b"].ndim - 2))
    if method == "ia3":
        for module, p in ia3.plan(loaded.config, adapter.config).items():
            delta["layers"][module][~p.mask()] = 1.0
    return base, Adapter(delta, method, adapter.config)


def _peft_logits(peft_model, virtual_tokens=0):
    with torch.no_grad():
        logits = peft_model(input_ids=torch.tensor(TOKENS)).logits.float().numpy()
    return logits[:, virtual_tokens:]


@pytest.mark.parametrize("case", list(JFT_CASES))
def test_jft_adapter_loads_in_peft_with_the_same_logits(llama, case, tmp_path):
    from peft import PeftModel

    hf_model, _, loaded = llama
    base, adapter = _trained(case, loaded)
    ours = np.asarray(_logits(loaded.config, base, TOKENS, adapters=[adapter]))
    save_peft_adapter(adapter, loaded.config, tmp_path, base_model_name="tiny-llama")
    assert is_peft_adapter(tmp_path)
    # PiSSA's rewritten base is not saved: the doubled-rank adapter goes on the original.
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path).eval()
    virtual = JFT_CASES[case]["num_virtual_tokens"] if case == "prompt_tuning" else 0
    np.testing.assert_allclose(_peft_logits(peft_model, virtual), ours, atol=1e-4, rtol=0)
    assert np.abs(ours - hf_logits(hf_model, TOKENS)).max() > 1e-2


@pytest.mark.parametrize("case", [c for c in JFT_CASES if c != "pissa"])
def test_round_trip_gives_the_same_delta(llama, case, tmp_path):
    _, _, loaded = llama
    base, adapter = _trained(case, loaded)
    save_peft_adapter(adapter, loaded.config, tmp_path)
    _, (back,) = load_adapter(tmp_path, base, loaded.config)
    expected = bake(adapter.delta) if case == "prefix_tuning" else adapter.delta
    assert back.method == adapter.method
    assert jax.tree.structure(back.delta) == jax.tree.structure(expected)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
                 back.delta, expected)


def test_pissa_round_trip_keeps_the_logits_with_doubled_rank(llama, tmp_path):
    _, _, loaded = llama
    base, adapter = _trained("pissa", loaded)
    save_peft_adapter(adapter, loaded.config, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["rank_pattern"]) == (
        8, 16, {"up_proj": 4})
    original, adapters = load_adapter(tmp_path, loaded.params, loaded.config)
    np.testing.assert_allclose(
        np.asarray(_logits(loaded.config, original, TOKENS, adapters=adapters)),
        np.asarray(_logits(loaded.config, base, TOKENS, adapters=[adapter])), atol=1e-4, rtol=0)


def _peft_configs():
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    return {
        "rslora_patterns": LoraConfig(
            r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "down_proj"],
            layers_to_transform=[0, 2], rank_pattern={"down_proj": 2},
            alpha_pattern={"model.layers.2.self_attn.q_proj": 3.0}),
        "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear"),
        "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                         feedforward_modules=["down_proj"]),
        "prompt_tuning": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "prefix_tuning": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                            prefix_projection=True),
    }


@pytest.mark.parametrize("case", ["rslora_patterns", "dora", "ia3", "prompt_tuning",
                                  "prefix_tuning"])
def test_peft_adapter_loads_in_jft_with_the_same_logits(llama, case, tmp_path):
    from peft import get_peft_model

    hf_model, directory, _ = llama
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(hf_model), _peft_configs()[case])
    with torch.no_grad():  # trained-like: every adapter weight off its (identity) init
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn_like(param))
    peft_model.save_pretrained(tmp_path)
    virtual = 3 if case == "prompt_tuning" else 0
    theirs = _peft_logits(peft_model.eval(), virtual)
    loaded = jft.load(directory, dtype="float32", compute_dtype="float32", adapter=tmp_path)
    np.testing.assert_allclose(np.asarray(loaded.logits(TOKENS)), theirs, atol=1e-4, rtol=0)


@pytest.fixture()
def lora_dir(llama, tmp_path):
    _, _, loaded = llama
    save_peft_adapter(_trained("lora", loaded)[1], loaded.config, tmp_path)
    return tmp_path


def _rewrite_tensors(directory, edit):
    from safetensors.numpy import load_file, save_file

    path = directory / "adapter_model.safetensors"
    save_file(edit(load_file(str(path))), str(path))


def test_tensors_for_another_model_name_the_first_mismatch(llama, lora_dir):
    _, _, loaded = llama
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _rewrite_tensors(lora_dir, lambda t: {**t, key: t[key][:, :32]})  # hidden size 32
    with pytest.raises(JftError, match=rf"adapter_model.safetensors: tensor {key} has shape "
                                       r"\(4, 32\), expected \(4, 64\)"):
        load_adapter(lora_dir, loaded.params, loaded.config)
    layer5 = key.replace("layers.0", "layers.5")
    _rewrite_tensors(lora_dir, lambda t: {**t, layer5: t[key]})
    with pytest.raises(JftError, match=r"layers\.5\..*is for layer 5, but the model has "
                                       r"layers 0\.\.2"):
        load_adapter(lora_dir, loaded.params, loaded.config)
    _rewrite_tensors(lora_dir, lambda t: {k: v for k, v in t.items() if k not in (key, layer5)})
    with pytest.raises(JftError, match=f"lacks tensor {key}"):
        load_adapter(lora_dir, loaded.params, loaded.config)


@pytest.mark.parametrize("edit, message", [
    ({"modules_to_save": ["lm_head"]}, "modules_to_save=.*not supported by jft's lora"),
    ({"bias": "all"}, "bias='all' is not supported"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'.*rewritten base"),
    ({"peft_type": "LOHA"}, "peft_type 'LOHA' is not supported; valid: LORA"),
])
def test_unsupported_options_are_refused_by_key(llama, lora_dir, edit, message):
    _, _, loaded = llama
    path = lora_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(JftError, match=message):
        load_adapter(lora_dir, loaded.params, loaded.config)


def test_methods_peft_cannot_express_are_refused(llama, tmp_path):
    _, _, loaded = llama
    with pytest.raises(JftError, match=r"s2ft cannot be written as a PEFT adapter \(PEFT has "
                                       r"no equivalent\); export it with --format merged.*lora"):
        save_peft_adapter(Adapter({}, "s2ft", None), loaded.config, tmp_path)
    assert not is_peft_adapter(tmp_path)


def test_a_bfloat16_peft_adapter_loads(llama, lora_dir):
    from safetensors.numpy import load_file
    from safetensors.torch import save_file

    _, _, loaded = llama
    _, (expected,) = load_adapter(lora_dir, loaded.params, loaded.config)
    path = lora_dir / "adapter_model.safetensors"
    # As PEFT saves an adapter trained in bfloat16: read through jft's own safetensors reader.
    save_file({k: torch.from_numpy(v).bfloat16() for k, v in load_file(str(path)).items()},
              str(path))
    assert b'"dtype":"BF16"' in path.read_bytes()[:4096]
    _, (back,) = load_adapter(lora_dir, loaded.params, loaded.config)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-6),
                 back.delta, expected.delta)
