"""PEFT adapter directories for mixture-of-experts models: jft's LoRA on attention, the
shared expert, the router and the routed expert stacks loads in PEFT (target_parameters,
ParamWrapper's layouts and nesting), PEFT's loads in jft, both with the same logits, and
what PEFT's ParamWrapper cannot hold is refused by its adapter_config.json field."""

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
from jft.formats.peft_adapter import save_peft_adapter
from jft.models import forward
from jft.models.sites import linear_site
from jft.peft import Adapter, lora
from jft.peft.factory import make_config
from tests.hf_reference import VOCAB, hf_logits, save_hf_model

TOKENS = np.random.default_rng(0).integers(3, VOCAB, size=(2, 7))
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ROUTER = "mlp.gate.weight"
SHARED = ["gate_proj", "up_proj", "down_proj", "shared_expert_gate"]
_logits = jax.jit(forward, static_argnums=0)

# (family, jft LoRA options): ranks above 1 with several experts tell PEFT's two
# interleavings (lora_A's expert-major rows, lora_B's rank-major columns) apart.
JFT_CASES = {
    # Dropout (training only) is written as 0, which PEFT's ParamWrapper requires; a
    # rank_pattern cuts the down stack's padded rank.
    "qwen3_moe": dict(r=3, alpha=6.0, dropout=0.1, targets=["q_proj", "o_proj"],
                      target_parameters=[*EXPERTS, ROUTER],
                      rank_pattern={"experts.down_proj": 2}),
    # gate_up_proj in layer 1 only: PEFT nests it inside down_proj there alone, and names
    # it per layer (its layers_to_transform does not reach target_parameters).
    "mixtral": dict(r=2, alpha=4.0, rslora=True, targets=["v_proj"],
                    target_parameters=["mlp.experts.down_proj",
                                       "model.layers.1.mlp.experts.gate_up_proj", ROUTER]),
    # The shared expert's gate has one output: rank 2 there is redundant but allowed, as
    # in PEFT.
    "qwen2_moe": dict(r=2, alpha=4.0, targets=["k_proj", *SHARED],
                      target_parameters=[*EXPERTS, ROUTER]),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (HF model, its directory, the jft model loaded from it in fp32), built
    once each, on first use."""
    cache = {}

    def get(family):
        if family not in cache:
            directory = tmp_path_factory.mktemp(family)
            hf_model = save_hf_model(family, directory)
            cache[family] = hf_model, directory, jft.load(directory, dtype="float32",
                                                          compute_dtype="float32")
        return cache[family]

    return get


def _trained(loaded, options, seed=1):
    """A jft LoRA as training leaves it: A and B both off their init (B is zero fresh,
    which would make the comparison vacuous), the rank padding zero. Drawn with numpy:
    `create`'s jax.random init compiles slowly on CPU."""
    model, config = loaded.config, make_config("lora", options)
    rng = np.random.default_rng(seed)
    layers = {}
    for module, p in lora.plan(model, config).items():
        site = linear_site(model, module)
        group, (dims_in, dims_out) = site.group_shape(model), site.dims(model)
        mask = p.rank_mask()  # [L, R]
        num_layers, rank = mask.shape
        a = rng.standard_normal((num_layers, *group, *dims_in, rank)) * mask.reshape(
            num_layers, *[1] * (len(group) + len(dims_in)), rank)
        b = rng.standard_normal((num_layers, *group, rank, *dims_out)) * mask.reshape(
            num_layers, *[1] * len(group), rank, *[1] * len(dims_out))
        layers[module] = {"a": (0.3 * a).astype(np.float32), "b": (0.3 * b).astype(np.float32)}
    return Adapter({"layers": layers}, "lora", config)


def _peft_logits(peft_model):
    with torch.no_grad():
        return peft_model(input_ids=torch.tensor(TOKENS)).logits.float().numpy()


@pytest.mark.parametrize("family", list(JFT_CASES))
def test_jft_moe_lora_loads_in_peft_with_the_same_logits(models, family, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.numpy import load_file

    hf_model, _, loaded = models(family)
    adapter = _trained(loaded, JFT_CASES[family])
    ours = np.asarray(_logits(loaded.config, loaded.params, TOKENS, adapters=[adapter]))
    save_peft_adapter(adapter, loaded.config, tmp_path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path).eval()
    # Every written tensor is one PEFT placed (a misnamed key would only warn).
    written = load_file(str(tmp_path / "adapter_model.safetensors"))
    placed = {k: v.numpy() for k, v in get_peft_model_state_dict(peft_model).items()}
    assert sorted(placed) == sorted(written)
    np.testing.assert_allclose(_peft_logits(peft_model), ours, atol=1e-4, rtol=0)
    assert np.abs(ours - hf_logits(hf_model, TOKENS)).max() > 1e-2


def test_the_key_layout_is_peft_s_own(models, tmp_path):
    """Keys and shapes as PEFT saves this adapter: ParamWrapper's tensors on the module,
    gate_up_proj's under base_layer. where down_proj's wrapper nests it (layer 1)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.numpy import load_file

    hf_model, _, loaded = models("mixtral")
    save_peft_adapter(_trained(loaded, JFT_CASES["mixtral"]), loaded.config, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["target_modules"] == ["v_proj"] and written["lora_dropout"] == 0.0
    assert sorted(written["target_parameters"]) == sorted(
        ["mlp.experts.down_proj", "model.layers.1.mlp.experts.gate_up_proj", ROUTER])
    options = {k: written[k] for k in ("r", "lora_alpha", "use_rslora", "target_modules",
                                       "target_parameters")}
    theirs = get_peft_model_state_dict(get_peft_model(copy.deepcopy(hf_model),
                                                      LoraConfig(**options)))
    ours = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in theirs.items()}
    prefix = "base_model.model.model.layers.1.mlp."
    assert ours[prefix + "experts.base_layer.lora_A.weight"].shape == (2 * 4, 64)  # gate_up
    assert ours[prefix + "experts.lora_A.weight"].shape == (2 * 4, 32)  # down_proj
    assert ours[prefix + "gate.lora_B.weight"].shape == (4, 2)  # the router, [E, r]


def _peft_configs():
    from peft import LoraConfig

    return {
        "qwen3_moe": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                target_parameters=[*EXPERTS, ROUTER]),
        # layers_to_transform filters the modules, not target_parameters; a rank_pattern
        # on a parameter path.
        "mixtral": LoraConfig(r=3, lora_alpha=5, use_rslora=True, target_modules=["o_proj"],
                              layers_to_transform=[0, 2], target_parameters=EXPERTS,
                              rank_pattern={"model.layers.1.mlp.experts.down_proj": 1}),
        "qwen2_moe": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", *SHARED],
                                target_parameters=["mlp.experts.gate_up_proj", ROUTER]),
    }


def _peft_trained(hf_model, family, directory):
    """A PEFT model with every adapter weight off its init, saved to `directory`."""
    from peft import get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(hf_model), _peft_configs()[family])
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn_like(param))
    peft_model.save_pretrained(directory)
    return peft_model.eval()


@pytest.mark.parametrize("family", list(JFT_CASES))
def test_peft_moe_lora_loads_in_jft_with_the_same_logits(models, family, tmp_path):
    hf_model, _, loaded = models(family)
    theirs = _peft_logits(_peft_trained(hf_model, family, tmp_path))
    base, adapters = load_adapter(tmp_path, loaded.params, loaded.config)
    ours = np.asarray(_logits(loaded.config, base, TOKENS, adapters=adapters))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert np.abs(theirs - hf_logits(hf_model, TOKENS)).max() > 1e-2


def test_round_trip_gives_the_same_delta(models, tmp_path):
    _, _, loaded = models("qwen2_moe")
    adapter = _trained(loaded, JFT_CASES["qwen2_moe"])
    save_peft_adapter(adapter, loaded.config, tmp_path)
    _, (back,) = load_adapter(tmp_path, loaded.params, loaded.config)
    assert jax.tree.structure(back.delta) == jax.tree.structure(adapter.delta)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
                 back.delta, adapter.delta)


@pytest.mark.parametrize("edit, message", [
    ({"lora_dropout": 0.1}, r"adapter_config\.json: lora_dropout=0\.1 with target_parameters"),
    ({"use_dora": True}, r"adapter_config\.json: use_dora=True with target_parameters"),
    ({"target_parameters": ["mlp.experts.w1"]},
     r"adapter_config\.json: target_parameters entry 'mlp\.experts\.w1' names no parameter "
     r"jft adapts in qwen3_moe; valid: mlp\.gate\.weight, mlp\.experts\.gate_up_proj"),
    # Without down_proj targeted, gate_up_proj's wrapper is the outer one: its nested
    # tensors are left over.
    ({"target_parameters": ["mlp.experts.gate_up_proj"]},
     r"unexpected tensor base_model\.model\.model\.layers\.0\.mlp\.experts\.base_layer\."
     r"lora_A\.weight"),
])
def test_what_peft_s_param_wrapper_cannot_hold_is_refused_by_field(models, tmp_path, edit,
                                                                   message):
    hf_model, _, loaded = models("qwen3_moe")
    _peft_trained(hf_model, "qwen3_moe", tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(JftError, match=message):
        load_adapter(tmp_path, loaded.params, loaded.config)


def test_dora_on_the_router_is_refused_on_export(models, tmp_path):
    _, _, loaded = models("qwen3_moe")
    # The refusal reads the config alone (jft trains DoRA on a router; PEFT cannot hold it).
    config = make_config("lora", dict(r=2, dora=True, targets=["q_proj"],
                                      target_parameters=[ROUTER]))
    adapter = Adapter({"layers": {}}, "lora", config)
    with pytest.raises(JftError, match=r"lora with dora on router cannot be written as a PEFT "
                                       r"adapter.*ParamWrapper has no DoRA"):
        save_peft_adapter(adapter, loaded.config, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()
