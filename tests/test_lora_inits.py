"""Data-driven LoRA inits on a tiny Llama: PiSSA, EVA, CorDA and LoRA-GA each checked for
its defining property, and against PEFT's own init of the same model where PEFT
computes the same thing."""

from __future__ import annotations

import copy
import math
from collections import Counter, defaultdict
from functools import partial

import jax
import numpy as np
import pytest
import torch

from jft.errors import JftError
from jft.formats.loading import load_checkpoint
from jft.models import forward
from jft.models.sites import TRANSFORMER_SITES, linear_site
from jft.peft import REGISTRY, Adapter, MethodBase, lora_inits, register
from jft.peft.lora import LORA, LoraConfig, plan
from tests.hf_reference import VOCAB, save_hf_model

ALL = tuple(site.name for site in TRANSFORMER_SITES)
_RNG = np.random.default_rng(0)
# Two batches: plain rows, then packed rows with padding and a loss mask.
# Plain rows, then two packed segments with padding and a loss mask. One row per batch
# (PEFT's CorDA hook takes one sequence per forward), all one shape (one compilation).
CALIBRATION = [
    {"tokens": _RNG.integers(3, VOCAB, (1, 16))},
    {"tokens": _RNG.integers(3, VOCAB, (1, 16)),
     "segment_ids": np.array([[1] * 6 + [2] * 7 + [0] * 3]),
     "loss_mask": np.array([[0] * 3 + [1] * 13], bool)},
    {"tokens": _RNG.integers(3, VOCAB, (1, 16))},
]
# Sequences without padding, for comparisons with PEFT (whose statistics include padding).
SEQUENCES = [_RNG.integers(3, VOCAB, (1, 16)) for _ in range(3)]
TOKENS = _RNG.integers(3, VOCAB, (2, 9))
# Layer 1's q_proj gets rank 2 (a PEFT rank_pattern key).
LAYER1_Q = "model.layers.1.self_attn.q_proj"




@pytest.fixture(scope="module")
def inits(llama):
    """config -> its delta, computed once per module (calibration: CALIBRATION)."""
    _, model, base = llama
    cache = {}

    def get(config, batches=None):
        key = (config, id(batches))
        if key not in cache:
            cache[key] = LORA.init(jax.random.key(0), base, model, config,
                                   CALIBRATION if batches is None else batches)
        return cache[key]

    return get


def _product(delta, model, config, module):
    """s A B per layer, in the weight's layout [L, *in, *out]."""
    p = plan(model, config)[module]
    entry = delta["layers"][module]
    return np.stack([p.scales[i] * np.tensordot(np.asarray(entry["a"][i]),
                                                np.asarray(entry["b"][i]), axes=1)
                     for i in range(model.num_layers)])


def _matrix(weight, model, module):
    """One layer's [*in, *out] weight (or gradient) as a matrix [in, out]."""
    dims_in, dims_out = linear_site(model, module).dims(model)
    return np.asarray(weight).reshape(math.prod(dims_in), math.prod(dims_out))


def _factors(delta, model, module, layer):
    """One layer's a [*in, R] and b [R, *out] as matrices [in, R] and [R, out]."""
    dims_in, dims_out = linear_site(model, module).dims(model)
    entry = delta["layers"][module]
    return (np.asarray(entry["a"][layer]).reshape(math.prod(dims_in), -1),
            np.asarray(entry["b"][layer]).reshape(-1, math.prod(dims_out)))


def _assert_rebased_reconstructs(base, delta, model, config):
    rebased = LORA.rebase(base, delta, model, config)
    for module in plan(model, config):
        np.testing.assert_allclose(
            np.asarray(rebased["layers"][module]) + _product(delta, model, config, module),
            np.asarray(base["layers"][module]), atol=1e-5, rtol=0, err_msg=module)
    return rebased


_forward = jax.jit(forward, static_argnums=0)


def _assert_forward_equals_base(base, delta, model, config):
    rebased = LORA.rebase(base, delta, model, config)
    adapted = _forward(model, rebased, TOKENS, adapters=(Adapter(delta, "lora", config),))
    np.testing.assert_allclose(np.asarray(adapted), np.asarray(_forward(model, base, TOKENS)),
                               atol=1e-4, rtol=0)


# ---------------------------------------------------------------- PEFT helpers


def _hf_path(module, layer):
    kind = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"model.layers.{layer}.{kind}.{module}"


def _peft_layer(peft_model, module, layer):
    return peft_model.base_model.model.get_submodule(_hf_path(module, layer))


def _peft_factors(peft_model, model, module):
    """PEFT's lora_A [r, in] / lora_B [out, r] per layer, as jft's a [in, r] / b [r, out]."""
    a, b = [], []
    for layer in range(model.num_layers):
        wrapped = _peft_layer(peft_model, module, layer)
        a.append(wrapped.lora_A["default"].weight.detach().numpy().T)
        b.append(wrapped.lora_B["default"].weight.detach().numpy().T)
    return a, b


def _peft_base(peft_model, model, module):
    """The (rewritten) base weights of PEFT's model in jft's layout [L, *in, *out]."""
    dims_in, dims_out = linear_site(model, module).dims(model)
    return np.stack([
        _peft_layer(peft_model, module, layer).base_layer.weight.detach().numpy().T
        .reshape(*dims_in, *dims_out) for layer in range(model.num_layers)])


# ---------------------------------------------------------------- PiSSA

PISSA = LoraConfig(r=4, alpha=8, targets="all-linear", init="pissa",
                   rank_pattern=((LAYER1_Q, 2),))


def test_pissa_rebased_base_plus_scaled_product_reconstructs_weight(llama, inits):
    _, model, base = llama
    delta = inits(PISSA)
    assert plan(model, PISSA)["q_proj"].ranks == (4, 2, 4)
    for entry in delta["layers"].values():  # the initial factors are recorded
        np.testing.assert_array_equal(entry["init_a"], entry["a"])
        np.testing.assert_array_equal(entry["init_b"], entry["b"])
    _assert_rebased_reconstructs(base, delta, model, PISSA)


def test_pissa_scaled_product_is_the_truncated_svd_of_the_weight(llama, inits):
    _, model, base = llama
    delta = inits(PISSA)
    for module, p in plan(model, PISSA).items():
        product = _product(delta, model, PISSA, module)
        for layer, r in enumerate(p.ranks):
            u, s, vt = np.linalg.svd(_matrix(base["layers"][module][layer], model, module))
            best = (u[:, :r] * s[:r]) @ vt[:r]
            # Two float32 SVDs agree to rounding scaled by the largest singular value.
            np.testing.assert_allclose(_matrix(product[layer], model, module), best,
                                       atol=1e-5 * s[0], rtol=0, err_msg=f"{module} {layer}")


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora_randomized_svd"])
def test_pissa_forward_right_after_init_equals_base_model(llama, inits, dora):
    _, model, base = llama
    config = LoraConfig(r=4, alpha=8, targets=("q_proj", "o_proj", "down_proj"), init="pissa",
                        rslora=True, dora=dora, init_options={"niter": 2} if dora else {})
    delta = inits(config)
    _assert_rebased_reconstructs(base, delta, model, config)
    _assert_forward_equals_base(base, delta, model, config)


def test_pissa_matches_peft_product_and_residual_weight(llama, inits):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    hf_model, model, base = llama
    delta = inits(PISSA)
    rebased = LORA.rebase(base, delta, model, PISSA)
    peft_model = get_peft_model(copy.deepcopy(hf_model), PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=list(ALL), init_lora_weights="pissa",
        rank_pattern={LAYER1_Q: 2}))
    for module, p in plan(model, PISSA).items():
        a, b = _peft_factors(peft_model, model, module)
        dims_in, dims_out = linear_site(model, module).dims(model)
        theirs = np.stack([(p.scales[i] * a[i] @ b[i]).reshape(*dims_in, *dims_out)
                           for i in range(model.num_layers)])
        np.testing.assert_allclose(_product(delta, model, PISSA, module), theirs,
                                   atol=5e-5, rtol=0, err_msg=module)
        np.testing.assert_allclose(np.asarray(rebased["layers"][module]),
                                   _peft_base(peft_model, model, module),
                                   atol=5e-5, rtol=0, err_msg=module)


def test_svd_lowrank_is_exact_on_a_low_rank_matrix():
    keys = jax.random.split(jax.random.key(1), 2)
    low_rank = jax.random.normal(keys[0], (40, 3)) @ jax.random.normal(keys[1], (3, 30))
    svd = jax.jit(partial(lora_inits.svd_lowrank, q=3, niter=2))
    for matrix in (low_rank, low_rank.T):  # tall and wide
        u, s, vt = svd(jax.random.key(2), matrix)
        assert u.shape == (matrix.shape[0], 3) and vt.shape == (3, matrix.shape[1])
        np.testing.assert_allclose(np.asarray((u * s) @ vt), np.asarray(matrix), atol=1e-4)


# ---------------------------------------------------------------- EVA

EVA = LoraConfig(r=3, alpha=6, targets=("q_proj", "v_proj", "o_proj", "down_proj"), init="eva",
                 init_options={"rho": 1.0})


class _Recorder(MethodBase):
    """Records every linear's input as the real forward pass computes it."""

    name = "test_lora_inits_recorder"

    def __init__(self):
        self.inputs = defaultdict(list)

    def wraps_linear(self, site, delta, delta_layer, config):
        return True

    def linear(self, site, x, inner, delta, delta_layer, layer, config):
        jax.debug.callback(partial(self._record, site.name), layer.index, x)
        return inner(x)

    def _record(self, module, index, x):
        self.inputs[module, int(index)].append(np.asarray(x))


def _capture(model, base, batches):
    """(module, layer) -> the linear's inputs [n, in] in the real forward pass, at the
    tokens EVA uses (not padding, inside the loss mask)."""
    recorder = register(_Recorder())
    try:
        for batch in batches:
            forward(model, base, batch["tokens"], segment_ids=batch.get("segment_ids"),
                    adapters=(Adapter({}, recorder.name, None),))
            jax.effects_barrier()
    finally:
        REGISTRY.pop(recorder.name)
    rows = {}
    for (module, layer), per_batch in recorder.inputs.items():
        kept = []
        for batch, x in zip(batches, per_batch, strict=True):
            keep = np.ones(batch["tokens"].shape, bool)
            if "segment_ids" in batch:
                keep &= batch["segment_ids"] != 0
            if "loss_mask" in batch:
                keep &= batch["loss_mask"]
            kept.append(x.reshape(*x.shape[:2], -1)[keep])
        rows[module, layer] = np.concatenate(kept).astype(np.float64)
    return rows


@pytest.fixture(scope="module")
def captured(llama):
    _, model, base = llama
    return _capture(model, base, CALIBRATION)


def _assert_eva_directions(delta, model, config, captured):
    for module, p in plan(model, config).items():
        entry = delta["layers"][module]
        assert "init_a" not in entry
        np.testing.assert_array_equal(entry["b"], 0)
        for layer, r in enumerate(p.ranks):
            a, _ = _factors(delta, model, module, layer)
            directions, _ = _principal(captured[module, layer])
            # A's columns are the top-r directions themselves, in order (up to sign)
            np.testing.assert_allclose(np.abs(directions[:r] @ a), np.eye(r), atol=2e-3,
                                       err_msg=f"{module} {layer}")


def _principal(rows):
    """Principal directions (rows of Vt) and explained-variance ratios of the data."""
    centred = rows - rows.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    return vt, s**2 / np.sum(s**2)


def test_eva_a_columns_are_top_principal_directions_of_captured_inputs(llama, inits, captured):
    _, model, _ = llama
    _assert_eva_directions(inits(EVA), model, EVA, captured)


def test_eva_inputs_match_forward_on_gemma3_sliding_local_rope_layers(tmp_path):
    """EVA runs the layers itself; on Gemma 3 (sliding layers with their own rope, q/k
    norms, post norms, scaled embeddings) its inputs are still the forward pass's."""
    save_hf_model("gemma3", tmp_path)
    checkpoint = load_checkpoint(tmp_path, dtype="float32")
    model, base = checkpoint.config.replace(dtype="float32"), checkpoint.params
    batches = CALIBRATION[1:]  # 13 + 16 tokens: more than the window of 5
    config = LoraConfig(r=2, targets=("q_proj", "o_proj", "down_proj"), init="eva",
                        init_options={"rho": 1.0})
    delta = LORA.init(jax.random.key(0), base, model, config, batches)
    _assert_eva_directions(delta, model, config, _capture(model, base, batches))


def test_eva_forward_right_after_init_equals_base_model(llama, inits):
    _, model, base = llama
    _assert_forward_equals_base(base, inits(EVA), model, EVA)


def test_eva_redistribution_gives_the_rank_budget_to_the_largest_explained_variance(
        llama, captured):
    _, model, base = llama
    rho = 2.0
    config = LoraConfig(r=3, alpha=6, targets=("q_proj", "v_proj", "o_proj", "down_proj"),
                        init="eva", init_options={"rho": rho})
    with pytest.raises(JftError, match="jft.peft.create"):  # init cannot change the config
        LORA.init(jax.random.key(0), base, model, config, CALIBRATION)
    new_config, delta = lora_inits.init_eva(jax.random.key(0), base, model, config, CALIBRATION)

    # The reference: every (module, layer) offers its round(r * rho) largest ratios
    # (layer-major, PEFT's module order); the budget goes to the largest overall.
    keys, values = [], []
    for layer in range(model.num_layers):
        for module in plan(model, config):
            _, ratios = _principal(captured[module, layer])
            keys += [(module, layer)] * round(config.r * rho)
            values.append(ratios[: round(config.r * rho)])
    budget = config.r * len(plan(model, config)) * model.num_layers
    winners = Counter(keys[i] for i in np.argsort(-np.concatenate(values), kind="stable")[:budget])
    new_plan = plan(model, new_config)
    got = {(m, layer): r for m, p in new_plan.items() for layer, r in enumerate(p.ranks)}
    assert got == {key: winners.get(key, 0) for key in got}
    assert sum(got.values()) == budget and len(set(got.values())) > 1
    # PEFT's own keys: module paths, as its EVA writes rank_pattern
    assert dict(new_config.rank_pattern)["model.layers.2.self_attn.o_proj"] == got["o_proj", 2]
    for module, p in new_plan.items():  # alpha scaled with the rank: s stays alpha / r
        assert all(s == pytest.approx(config.alpha / config.r) for s, r in
                   zip(p.scales, p.ranks, strict=True) if r)
        for layer, r in enumerate(p.ranks):
            a, _ = _factors(delta, model, module, layer)
            directions, _ = _principal(captured[module, layer])
            np.testing.assert_allclose(np.abs(directions[:r] @ a[:, :r]), np.eye(r), atol=2e-3)
            np.testing.assert_array_equal(a[:, r:], 0)
    assert dict(new_config.init_options)["rho"] == 1.0  # the config now inits directly
    again = LORA.init(jax.random.key(0), base, model, new_config, CALIBRATION)
    for module in new_plan:
        np.testing.assert_allclose(again["layers"][module]["a"], delta["layers"][module]["a"],
                                   atol=1e-6)


# ---------------------------------------------------------------- CorDA


def _corda(method):
    return LoraConfig(r=4, alpha=8, targets="all-linear", init="corda",
                      init_options={"corda_method": method})


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_rebased_base_reconstructs_weight_and_forward_equals_base(llama, inits, method):
    _, model, base = llama
    config = _corda(method)
    delta = inits(config)
    _assert_rebased_reconstructs(base, delta, model, config)
    _assert_forward_equals_base(base, delta, model, config)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_matches_peft_product_and_residual_weight(llama, inits, method):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    hf_model, model, base = llama
    config = _corda(method)
    batches = [{"tokens": s} for s in SEQUENCES]
    delta = inits(config, batches)
    rebased = LORA.rebase(base, delta, model, config)
    torch_model = copy.deepcopy(hf_model)
    peft_config = PeftLoraConfig(r=4, lora_alpha=8, target_modules=list(ALL),
                                 init_lora_weights="corda",
                                 corda_config=CordaConfig(corda_method=method))
    with torch.no_grad():
        preprocess_corda(torch_model, peft_config,
                         run_model=lambda: [torch_model(torch.tensor(s)) for s in SEQUENCES])
    peft_model = get_peft_model(torch_model, peft_config)
    for module, p in plan(model, config).items():
        a, b = _peft_factors(peft_model, model, module)
        dims_in, dims_out = linear_site(model, module).dims(model)
        theirs = np.stack([(p.scales[i] * a[i] @ b[i]).reshape(*dims_in, *dims_out)
                           for i in range(model.num_layers)])
        ours = _product(delta, model, config, module)
        tolerance = 1e-3 * np.abs(theirs).max()
        np.testing.assert_allclose(ours, theirs, atol=tolerance, rtol=0, err_msg=module)
        np.testing.assert_allclose(np.asarray(rebased["layers"][module]),
                                   _peft_base(peft_model, model, module),
                                   atol=tolerance, rtol=0, err_msg=module)


# ---------------------------------------------------------------- LoRA-GA


def _loraga(direction="ArB2r"):
    return LoraConfig(r=4, alpha=8, targets=("q_proj", "k_proj", "o_proj", "gate_proj",
                                             "down_proj"),
                      init="loraga", rank_pattern=((LAYER1_Q, 2),),
                      init_options={"direction": direction})


def test_loraga_rebased_base_reconstructs_weight_and_forward_equals_base(llama, inits):
    _, model, base = llama
    config = _loraga()
    delta = inits(config)
    _assert_rebased_reconstructs(base, delta, model, config)
    _assert_forward_equals_base(base, delta, model, config)


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr"])
def test_loraga_factors_are_gradient_singular_vectors_per_direction_rule(
        llama, inits, direction):
    _, model, base = llama
    config = _loraga(direction)
    delta = inits(config)
    # The gradient itself is checked against torch's below.
    gradients = lora_inits.loraga_gradients(base, model, config, CALIBRATION)
    for module, p in plan(model, config).items():
        dims_in, dims_out = linear_site(model, module).dims(model)
        stable = math.prod(dims_out) ** 0.25 / math.sqrt(16)
        for layer, r in enumerate(p.ranks):
            u, s, vt = np.linalg.svd(_matrix(gradients[module][layer], model, module))
            pick_a, pick_b = {"ArB2r": (np.arange(r), np.arange(r, 2 * r)),
                              "A2rBr": (np.arange(r, 2 * r), np.arange(r)),
                              "ArBr": (np.arange(1, 2 * r, 2), np.arange(0, 2 * r, 2))}[direction]
            a, b = _factors(delta, model, module, layer)
            a, b = a[:, :r], b[:r]
            expected_b = s[pick_b, None] * vt[pick_b] * stable
            for i in range(r):  # each component up to its own sign
                sign_a = np.sign(a[:, i] @ u[:, pick_a[i]])
                np.testing.assert_allclose(a[:, i] * sign_a, u[:, pick_a[i]], atol=2e-4)
                sign_b = np.sign(b[i] @ expected_b[i])
                np.testing.assert_allclose(b[i] * sign_b, expected_b[i],
                                           atol=2e-4 * np.abs(expected_b).max())


def test_loraga_gradient_matches_torch_and_factors_match_peft_up_to_sign(llama):
    from peft import LoraConfig as PeftLoraConfig
    from peft import LoraGAConfig, get_peft_model, preprocess_loraga

    hf_model, model, base = llama
    config = _loraga()
    # The last sequence: its first 3 tokens no targets, its last 3 padding.
    padding = np.array([[1] * 13 + [0] * 3])
    loss_mask = np.array([[0] * 3 + [1] * 13], bool)
    batches = [{"tokens": SEQUENCES[0]}, {"tokens": SEQUENCES[1]},
               {"tokens": SEQUENCES[2], "segment_ids": padding, "loss_mask": loss_mask}]
    labels = np.where(loss_mask & (padding != 0), SEQUENCES[2], -100)
    torch_model = copy.deepcopy(hf_model)
    peft_config = PeftLoraConfig(r=4, lora_alpha=8, target_modules=list(plan(model, config)),
                                 rank_pattern={LAYER1_Q: 2},
                                 init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())

    def train_step():
        for sequence in SEQUENCES[:2]:
            ids = torch.tensor(sequence)
            torch_model(input_ids=ids, labels=ids).loss.backward()
        torch_model(input_ids=torch.tensor(SEQUENCES[2]), attention_mask=torch.tensor(padding),
                    labels=torch.tensor(labels)).loss.backward()

    preprocess_loraga(torch_model, peft_config, train_step)
    ours = lora_inits.loraga_gradients(base, model, config, batches)
    for module in plan(model, config):
        dims_in, dims_out = linear_site(model, module).dims(model)
        theirs = np.stack([
            torch_model.get_submodule(_hf_path(module, layer))._peft_loraga_grad.numpy().T
            .reshape(*dims_in, *dims_out) for layer in range(model.num_layers)])
        np.testing.assert_allclose(np.asarray(ours[module]), theirs, atol=1e-5, rtol=0)

    torch.manual_seed(0)
    peft_model = get_peft_model(torch_model, peft_config)
    delta = LORA.init(jax.random.key(0), base, model, config, batches)
    for module, p in plan(model, config).items():
        peft_a, peft_b = _peft_factors(peft_model, model, module)
        for layer, r in enumerate(p.ranks):
            a, b = _factors(delta, model, module, layer)
            a, b = a[:, :r], b[:r]
            # The same components up to sign; PEFT's randomized svd_lowrank(q=4r, niter=4)
            # is within about 1% of the exact SVD here.
            cos_a = np.sum(a * peft_a[layer], axis=0) / np.linalg.norm(peft_a[layer], axis=0)
            np.testing.assert_allclose(np.abs(cos_a), 1, atol=1e-2)
            norm_b, peft_norm_b = np.linalg.norm(b, axis=1), np.linalg.norm(peft_b[layer], axis=1)
            cos_b = np.sum(b * peft_b[layer], axis=1) / norm_b / peft_norm_b
            np.testing.assert_allclose(np.abs(cos_b), 1, atol=1e-2)
            np.testing.assert_allclose(norm_b, peft_norm_b, rtol=2e-2)


# ---------------------------------------------------------------- options


def test_bad_options_and_missing_calibration_raise(llama):
    _, model, base = llama
    key = jax.random.key(0)
    with pytest.raises(JftError, match="unknown init_options"):
        LORA.init(key, base, model, LoraConfig(init="pissa", init_options={"rho": 2.0}))
    with pytest.raises(JftError, match="corda_method"):
        LORA.init(key, base, model, LoraConfig(init="corda",
                                               init_options={"corda_method": "xyz"}),
                  CALIBRATION)
    for name in ("eva", "corda", "loraga"):
        with pytest.raises(JftError, match="calibration_batches"):
            LORA.init(key, base, model, LoraConfig(init=name))
    with pytest.raises(JftError, match="2r"):  # k_proj's output is 2 heads x 16 = 32 wide
        LORA.init(key, base, model, LoraConfig(r=20, targets=("k_proj",), init="loraga"),
                  CALIBRATION)


def test_create_with_eva_redistributes_ranks_into_the_adapter_config():
    from jft.models import ModelConfig, RopeConfig, RuntimePolicy, init_params
    from jft.peft import create
    from jft.peft.lora import plan

    model = ModelConfig(family="llama", vocab_size=64, embed_dim=32, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, mlp_dim=48, norm_eps=1e-6,
                        rope=RopeConfig(), layer_types=("full", "full"),
                        policy=RuntimePolicy(dtype="float32"),
    )
    params = init_params(model, jax.random.key(0), std=0.3)
    batches = [{"tokens": jax.random.randint(jax.random.key(i), (2, 16), 0, 64)}
               for i in range(2)]
    base, adapter = create("lora", jax.random.key(1), params, model, batches, r=4,
                           targets=["q_proj", "v_proj", "down_proj"], init="eva")
    assert base is params  # EVA leaves the base alone
    ranks = [r for p in plan(model, adapter.config).values() for r in p.ranks]
    assert sum(ranks) == 4 * len(ranks)  # the budget is kept ...
    assert len(set(ranks)) > 1  # ... and redistributed (rho defaults to PEFT's 2)
    logits = forward(model, params, batches[0]["tokens"], adapters=[adapter])
    np.testing.assert_allclose(np.asarray(logits),
                               np.asarray(forward(model, params, batches[0]["tokens"])),
                               atol=1e-5)
