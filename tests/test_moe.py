"""Mixture-of-experts models: router losses equal transformers', the grouped expert path
equals the dense reference (values and gradients, empty experts, uneven groups), LoRA on
routed experts (merge, merged export read by transformers), methods that cannot run on
MoE refuse, a training run, and experts sharded over a mesh."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jft
from jft.errors import JftError
from jft.models import forward
from jft.models.grouped import grouped_matmul
from jft.models.moe import load_balancing_loss, z_loss
from jft.peft import get_method
from jft.peft.factory import create
from tests.hf_reference import MOE_CONFIGS, VOCAB, hf_logits, save_hf_model

EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]


@pytest.fixture(scope="module", params=list(MOE_CONFIGS))
def family(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = save_hf_model(request.param, directory)
    model = jft.load(directory, dtype="float32", compute_dtype="float32")
    return request.param, directory, hf_model, model


def _tokens(batch, length, seed=0):
    return np.random.default_rng(seed).integers(3, VOCAB, size=(batch, length))


def _lora_on_experts(model, seed=1, **options):
    """LoRA on attention, router and expert stacks, its B factors made non-zero."""
    base, adapter = create("lora", jax.random.key(0), model.params, model.config, r=2, alpha=4,
                           targets=["q_proj"], target_parameters=EXPERT_TARGETS, **options)
    leaves, treedef = jax.tree.flatten(adapter.delta)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [leaf + 0.3 * jax.random.normal(k, leaf.shape)
             for leaf, k in zip(leaves, keys, strict=True)]
    return base, adapter.with_delta(jax.tree.unflatten(treedef, noisy))


def test_parameter_count_equals_transformers(family):
    _, _, hf_model, model = family
    assert model.config.num_params() == sum(p.numel() for p in hf_model.parameters())


def test_router_losses_equal_transformers_with_padding(family):
    import torch

    name, _, hf_model, model = family
    tokens = _tokens(2, 11)
    mask = np.ones_like(tokens)
    mask[1, 7:] = 0  # right padding: its tokens are left out of the statistics
    with torch.no_grad():
        out = hf_model(torch.tensor(tokens), attention_mask=torch.tensor(mask),
                       output_router_logits=True)
    logits, aux = forward(model.config, model.params, tokens, segment_ids=mask, return_aux=True)
    stats = aux["router"]
    np.testing.assert_allclose(float(load_balancing_loss(stats)), float(out.aux_loss), rtol=1e-5)
    # ST-MoE's z-loss, from transformers' router logits of the real tokens.
    router_logits = np.stack([r.numpy() for r in out.router_logits])  # [L, B*T, E]
    lse = np.log(np.exp(router_logits).sum(-1))
    real = mask.reshape(-1).astype(bool)
    np.testing.assert_allclose(float(z_loss(stats)), np.mean(lse[:, real] ** 2), rtol=1e-5)
    real_logits = np.asarray(logits)[mask.astype(bool)]
    np.testing.assert_allclose(real_logits, hf_logits(hf_model, tokens, mask)[mask.astype(bool)],
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("sizes", [[5, 0, 130, 1], [0, 0, 7, 0], [64, 64, 0, 3]],
                         ids=["uneven", "one-group", "tile-aligned"])
def test_grouped_matmul_equals_per_row_products(sizes):
    rng = np.random.default_rng(0)
    groups, rows = len(sizes), sum(sizes)
    x = jnp.asarray(rng.normal(size=(rows, 12)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(groups, 12, 9)), jnp.float32)
    group_of = np.repeat(np.arange(groups), sizes)
    sizes = jnp.asarray(sizes)

    def reference(x, w):
        return jnp.einsum("mk,mkn->mn", x, w[group_of])

    np.testing.assert_allclose(jax.jit(grouped_matmul)(x, w, sizes), reference(x, w),
                               atol=1e-5, rtol=1e-5)
    grads = jax.grad(lambda x, w: jnp.sum(jnp.sin(grouped_matmul(x, w, sizes))), (0, 1))(x, w)
    expected = jax.grad(lambda x, w: jnp.sum(jnp.sin(reference(x, w))), (0, 1))(x, w)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_grouped_path_equals_dense_reference_with_lora_on_experts(family):
    name, _, _, model = family
    if name in ("mixtral", "olmoe"):  # same expert path as qwen3_moe; compiles are slow
        pytest.skip("the expert path is covered by qwen3_moe and qwen2_moe")
    base, adapter = _lora_on_experts(model)
    # One token's top-k of 4-6 experts leaves experts with no row: their groups are empty.
    # (Uneven groups: test_grouped_matmul_equals_per_row_products.)
    tokens = _tokens(1, 1, seed=3)
    results = {}
    for impl in ("grouped", "dense"):
        config = model.config.replace(moe_impl=impl)

        def loss(delta, params, config=config):
            logits = forward(config, params, tokens, adapters=[adapter.with_delta(delta)])
            return jnp.sum(jnp.sin(logits)), logits

        grads, logits = jax.jit(jax.grad(loss, (0, 1), has_aux=True))(adapter.delta, base)
        results[impl] = (logits, grads)
    np.testing.assert_allclose(results["grouped"][0], results["dense"][0], atol=1e-5, rtol=0)
    for got, want in zip(jax.tree.leaves(results["grouped"][1]),
                         jax.tree.leaves(results["dense"][1]), strict=True):
        # float32 sums in another order: 1e-4 of the gradient's own scale
        np.testing.assert_allclose(got, want, atol=1e-4 * float(np.abs(want).max()), rtol=0)


def test_lora_on_experts_merges_and_exports_to_transformers(family, tmp_path):
    import torch
    import transformers

    from jft.formats.hf_export import write_hf_dir

    name, _, _, model = family
    base, adapter = _lora_on_experts(model)
    tokens = _tokens(2, 9)
    unmerged = np.asarray(forward(model.config, base, tokens, adapters=[adapter]))
    merged = get_method("lora").merge(base, adapter.delta, model.config, adapter.config)
    np.testing.assert_allclose(np.asarray(forward(model.config, merged, tokens)), unmerged,
                               atol=1e-4, rtol=0)
    write_hf_dir(dataclasses.replace(model, params=base, adapters=[adapter]), tmp_path / "out",
                 dtype="fp32")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                                 dtype=torch.float32)
    np.testing.assert_allclose(hf_logits(exported.eval(), tokens), unmerged, atol=1e-4, rtol=0)


def test_fused_expert_tensors_load_like_per_expert_ones(tmp_path):
    """transformers 5's in-memory layout ([E, 2F, D] gate_up_proj, [E, D, F] down_proj),
    as a checkpoint saved without converting back stores it, loads to the same params."""
    from safetensors.numpy import load_file, save_file

    save_hf_model("qwen3_moe", tmp_path / "split")
    per_expert = jft.load(tmp_path / "split", dtype="float32")
    tensors = load_file(tmp_path / "split" / "model.safetensors")
    config = per_expert.config
    fused = {k: v for k, v in tensors.items() if ".experts." not in k}
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}.mlp.experts."

        def expert(e, part, prefix=prefix):
            return tensors[f"{prefix}{e}.{part}.weight"]

        experts = range(config.num_experts)
        fused[prefix + "gate_up_proj"] = np.stack(
            [np.concatenate([expert(e, "gate_proj"), expert(e, "up_proj")]) for e in experts])
        fused[prefix + "down_proj"] = np.stack([expert(e, "down_proj") for e in experts])
    (tmp_path / "fused").mkdir()
    save_file(fused, tmp_path / "fused" / "model.safetensors")
    (tmp_path / "fused" / "config.json").write_text((tmp_path / "split" / "config.json")
                                                    .read_text())
    loaded = jft.load(tmp_path / "fused", dtype="float32")
    for got, want in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(per_expert.params),
                         strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_what_cannot_run_on_moe_refuses_in_one_line(tmp_path):
    save_hf_model("qwen3_moe", tmp_path / "m")
    model = jft.load(tmp_path / "m", dtype="float32")
    cases = [
        ("s2ft", {}, "method 's2ft' does not support mixture-of-experts models"),
        ("spiel", {}, "method 'spiel' does not support mixture-of-experts models"),
        ("ia3", dict(targets=["k_proj", "experts_down"], feedforward=["experts_down"]),
         "cannot target the expert stack 'experts_down'; lora can"),
        ("lora", dict(target_parameters=["mlp.experts.down_proj"], dora=True),
         "experts_down is a stack of experts"),
        ("lora", dict(target_parameters=["mlp.experts.up_proj"]),
         "target parameter 'mlp.experts.up_proj' matches no parameter"),
    ]
    for method, options, message in cases:
        with pytest.raises(JftError, match=message) as error:
            create(method, jax.random.key(0), model.params, model.config, **options)
        assert "\n" not in str(error.value)
    # The server's adapter banks do not route expert rows: such an adapter is refused.
    from jft.serve.adapters import prepare

    _, adapter = create("lora", jax.random.key(0), model.params, model.config,
                        target_parameters=["mlp.experts.down_proj"])
    with pytest.raises(JftError, match="adapts the expert stack 'experts_down'.*merged"):
        prepare("moe", tmp_path, "lora", adapter.config, adapter.delta, model.params,
                model.config, 8)
    # all-linear means the modules PEFT sees: attention, not the router or the experts.
    _, adapter = create("lora", jax.random.key(0), model.params, model.config,
                        targets="all-linear")
    assert set(adapter.delta["layers"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    # Dense layers between sparse ones are named, not silently mis-loaded.
    fields = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(fields | {"mlp_only_layers": [1]}))
    with pytest.raises(JftError, match=r"layers \[1\] have a dense MLP \(mlp_only_layers"):
        jft.load(tmp_path / "m")


def test_the_objectives_add_the_router_losses_to_their_own(tmp_path):
    """SFT's and the preference objectives' loss with the router's coefficients on is the
    loss without them plus exactly aux_loss_coef x balance + z_loss_coef x z-loss, and
    both terms are logged."""
    from jft.objectives.base import make_objective

    save_hf_model("qwen3_moe", tmp_path / "m")
    model = jft.load(tmp_path / "m", dtype="float32", compute_dtype="float32")
    _, adapter = _lora_on_experts(model)
    tokens = _tokens(2, 8)  # a preference pair: row 0 chosen, row 1 rejected
    batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens),
             "positions": np.broadcast_to(np.arange(8), tokens.shape),
             "loss_mask": np.broadcast_to(np.arange(8) >= 4, tokens.shape)}
    for objective in ("sft", "dpo"):
        losses = {}
        for coefs in ((0.0, 0.0), (0.3, 0.02)):
            moe = dataclasses.replace(model.config.moe, aux_loss_coef=coefs[0],
                                      z_loss_coef=coefs[1])
            loss = jax.jit(make_objective(objective).loss, static_argnums=0)
            value, metrics = loss(model.config.replace(moe=moe), model.params, [adapter], batch,
                                  None)
            losses[coefs] = float(value)
        expected = 0.3 * float(metrics["router/aux_loss"]) + 0.02 * float(
            metrics["router/z_loss"])
        assert expected > 0.01
        np.testing.assert_allclose(losses[(0.3, 0.02)] - losses[(0.0, 0.0)], expected,
                                   rtol=1e-4, err_msg=objective)


def test_lora_on_experts_trains_with_the_router_losses_logged(tmp_path):
    """An SFT run: the balance loss (the checkpoint's coefficient) and the z-loss (the
    run's) are logged each step, the loss falls, and the run's adapter reloads."""
    import torch
    import transformers

    from jft.train import fine_tune
    from tests.hf_reference import save_tiny_smollm2
    from tests.test_train_cli import ROOT

    tokenizer_dir = save_tiny_smollm2(tmp_path / "dense")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    moe = transformers.Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, tie_word_embeddings=True, router_aux_loss_coef=0.02,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    transformers.Qwen3MoeForCausalLM(moe).save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    run = tmp_path / "run"
    fine_tune(None, [f"model={tmp_path / 'moe'}", f"output_dir={run}",
                     f"data.train={ROOT / 'examples/quickstart/train.jsonl'}",
                     "data.format=prompt_completion", "data.max_length=48",
                     "method.name=lora", "method.r=4", "method.alpha=8",
                     "method.targets=[q_proj,v_proj]",
                     f"method.target_parameters=[{','.join(EXPERT_TARGETS)}]",
                     "moe.z_loss_coef=0.001", "train.steps=12", "train.batch_size=4",
                     "train.learning_rate=1e-2", "train.log_every=1", "checkpoint.every=12"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "router/aux_loss" in r]
    assert len(steps) == 12 and all(r["router/z_loss"] > 0 for r in steps)
    assert np.mean([r["loss"] for r in steps[-3:]]) < np.mean([r["loss"] for r in steps[:3]])
    loaded = jft.load(tmp_path / "moe", adapter=run, dtype="float32")
    assert {"experts_gate_up", "experts_down", "router"} <= set(
        loaded.adapters[0].delta["layers"])


SHARDED = textwrap.dedent(
    """
    import jax, numpy as np, optax
    from jft.models import ModelConfig, MoeConfig, RopeConfig, RuntimePolicy, init_params
    from jft.peft import create
    from jft.peft.optim import masked_optimizer
    from jft.sharding import MeshConfig, make_rules
    from jft.sharding.placement import put
    from jft.training.step import ShardedSteps

    config = ModelConfig(family="qwen3_moe", vocab_size=64, embed_dim=32, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48, norm_eps=1e-6,
                         rope=RopeConfig(), layer_types=("full", "full"), qk_norm=True,
                         moe=MoeConfig(num_experts=8, top_k=2, expert_mlp_dim=16,
                                       z_loss_coef=1e-3),
                         policy=RuntimePolicy(dtype="float32"))
    params = init_params(config, jax.random.key(0), std=0.2)
    tokens = np.asarray(jax.random.randint(jax.random.key(2), (8, 12), 0, 64))
    batch = {"tokens": tokens, "segment_ids": np.ones((8, 12), np.int32),
             "positions": np.broadcast_to(np.arange(12), (8, 12)).copy(),
             "loss_mask": np.ones((8, 12), bool)}
    base, adapter = create("lora", jax.random.key(1), params, config, r=4, targets=["q_proj"],
                           target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    optimizer = masked_optimizer(optax.adamw(1e-2), [adapter])
    one = ShardedSteps(config, optimizer, make_rules(MeshConfig(), jax.devices()[:1]), base,
                       [adapter], 0)
    state, expected = one.initial_state, []
    for _ in range(2):
        state, metrics = one.train(state, base, batch)
        expected.append(float(metrics["loss"]))
    for shape, rules in (((2, 2, 2), {}), ((1, 2, 4), {"experts": "tensor", "expert_mlp": None})):
        mesh_rules = make_rules(MeshConfig(*shape, rules=rules))
        steps = ShardedSteps(config, optimizer, mesh_rules, base, [adapter], 0)
        sharded = put(base, steps.params)
        state, losses = steps.initial_state, []
        for _ in range(2):
            state, metrics = steps.train(state, sharded, batch)
            losses.append(float(metrics["loss"]))
        np.testing.assert_allclose(losses, expected, rtol=2e-5, err_msg=str(shape))
        spec = sharded["layers"]["experts_gate_up"].sharding.spec
        print(shape, rules, spec)
    print("ok")
    """
)


def test_experts_shard_over_a_mesh_and_train_as_on_one_device():
    from tests.test_sharding import EIGHT

    out = subprocess.run([sys.executable, "-c", SHARDED], env=EIGHT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "ok"
    # FSDP splits each expert's inputs, the default tensor rule its MLP width; with
    # experts: tensor each device holds whole experts.
    assert lines[0].endswith("P(None, None, 'fsdp', None, 'tensor')"), lines[0]
    assert lines[1].endswith("P(None, 'tensor', 'fsdp', None, None)"), lines[1]
