"""Preference and reward tuning end to end (`python -m jft.train` with `objective:` dpo,
ipo, orpo, simpo, kto and grpo) on a tiny random model with SmolLM2's real tokenizer:
the step-0 values the losses must take, log-probabilities against transformers, the
reference (adapter off, precomputed and cached, an earlier run), GRPO's learning."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jft
from jft.errors import JftError
from jft.objectives.sequences import pair_sums, token_logps
from jft.train import fine_tune
from jft.training.data import DataConfig, batcher, read_split
from tests.hf_reference import save_tiny_smollm2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_smollm2(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Plain and chat preference files, a KTO file and GRPO prompts."""
    directory = tmp_path_factory.mktemp("data")
    plain = [{"prompt": f"Question {i}: is it raining?", "chosen": " Yes.",
              "rejected": f" No, it has not rained for {i} days."} for i in range(12)]
    chat = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": "Yes."}],
             "rejected": f"No, not for {i} days."} for i in range(12)]
    kto = [{"prompt": f"Question {i}:", "completion": " Yes." if i % 2 else " No.",
            "label": bool(i % 2)} for i in range(12)]
    prompts = [{"prompt": f"Say something {i}:", "completion": " :"} for i in range(16)]
    files = {}
    for name, records in (("plain", plain), ("chat", chat), ("kto", kto),
                          ("prompts", prompts)):
        files[name] = directory / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in records))
    return files


def _train(tiny, data_file, tmp_path, objective, fmt="preference", steps=2, name="run",
           *overrides):
    run = fine_tune(None, [
        f"model={tiny}", f"data.train={data_file}", f"data.format={fmt}",
        f"objective.name={objective}", f"train.steps={steps}", "train.batch_size=4",
        "data.max_length=96", "train.learning_rate=1e-2",
        f"output_dir={tmp_path / name}", *overrides])
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_dpo_starts_at_log_2_with_zero_margins_and_logs_trl_metrics(tiny, data, tmp_path):
    records = _train(tiny, data["plain"], tmp_path, "dpo", "preference", 3)
    first = records[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first[key] == pytest.approx(0.0, abs=1e-6)
    assert first["logps/chosen"] > first["logps/rejected"]  # " Yes." is the shorter one
    assert records[-1]["rewards/margins"] > 0 and records[-1]["loss"] < math.log(2)


@pytest.mark.parametrize("objective, fmt, first_loss", [
    ("ipo", "preference", (1 / (2 * 0.1)) ** 2),  # (Δ − 1/(2τ))² with Δ = 0
    ("kto", "kto", 0.5),  # 1 − σ(0), with KL 0
])
def test_reference_losses_take_their_step_0_values(tiny, data, tmp_path, objective, fmt,
                                                   first_loss):
    records = _train(tiny, data["chat" if fmt == "preference" else "kto"], tmp_path,
                     objective, fmt, 2)
    assert records[0]["loss"] == pytest.approx(first_loss, rel=1e-6)
    if objective == "kto":
        assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_reference_free_losses_follow_their_formula_at_step_0(tiny, data, tmp_path,
                                                             objective):
    first = _train(tiny, data["plain"], tmp_path, objective, "preference", 1)[0]
    # Every pair has the same chosen and rejected length here apart from the count; the
    # logged means are over pairs, and at step 0 the per-pair terms are what we compute.
    assert first["rewards/chosen"] < 0 and "rewards/accuracies" in first
    if objective == "orpo":
        assert first["loss"] == pytest.approx(first["nll_loss"] - 0.1 * first[
            "log_odds_ratio"], rel=1e-5)


def test_completion_log_probs_equal_transformers_with_packing(tiny, data):
    """Several pairs packed into each row: each pair's summed completion log-probs are
    those of transformers' model on the sequence alone."""
    model = jft.load(str(tiny), dtype="float32")
    config = DataConfig(train=str(data["plain"]), format="preference", max_length=96)
    records, tokens = read_split(config, model.tokenizer)
    batch = next(iter(batcher(tokens, config, model.tokenizer, 2, split="eval")))
    assert (batch["segment_ids"].max(axis=1) > 1).any()  # packed
    logps, mask = token_logps(model.config, model.params, (), {
        k: jnp.asarray(v) for k, v in batch.items()})
    pairs = pair_sums(logps, mask, batch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny, torch_dtype=torch.float32)

    def hf_logp(ids, target_mask):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits[:-1], -1).gather(
            1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
        return float(logp[np.asarray(target_mask[1:])].sum())

    checked = 0
    for r in range(batch["tokens"].shape[0] // 2):
        for s in range(int(batch["segment_ids"][r].max())):
            for half, sums in ((0, pairs.first), (1, pairs.second)):
                row = r + half * (batch["tokens"].shape[0] // 2)
                where = batch["segment_ids"][row] == s + 1
                ids, target = batch["tokens"][row][where], batch["loss_mask"][row][where]
                np.testing.assert_allclose(float(sums[r, s]), hf_logp(ids.tolist(), target),
                                           rtol=2e-5, atol=2e-4)
                checked += 1
    assert checked >= 4


def test_precomputed_reference_matches_the_adapter_off_one_and_resumes_from_its_cache(
        tiny, data, tmp_path):
    online = _train(tiny, data["plain"], tmp_path, "dpo", "preference", 4, "online",
                    "train.schedule=constant")
    half = ["objective.precompute_reference=true", "checkpoint.every=2",
            "train.schedule=constant"]
    _train(tiny, data["plain"], tmp_path, "dpo", "preference", 2, "cached", *half)
    assert (tmp_path / "cached" / "reference_logps.safetensors").exists()
    resumed = _train(tiny, data["plain"], tmp_path, "dpo", "preference", 4, "cached", *half)
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in online],
                               rtol=2e-5)
    (tmp_path / "cached" / "reference_logps.safetensors").unlink()
    with pytest.raises(JftError, match="reference_logps.safetensors: missing"):
        _train(tiny, data["plain"], tmp_path, "dpo", "preference", 6, "cached", *half)


@pytest.mark.parametrize("method, precomputed", [("full", True), ("s2ft", False)])
def test_methods_that_rewrite_the_base_get_a_precomputed_reference(tiny, data, tmp_path,
                                                                   method, precomputed):
    """Full FT trains the base's own weights, so switching the adapter off cannot give the
    reference back: the run precomputes it. S²FT's co-permuted base computes the same
    model, so its adapter-off pass is the reference. DPO starts at log 2 either way."""
    run = fine_tune(None, [
        f"model={tiny}", f"data.train={data['plain']}", "data.format=preference",
        "objective=dpo", f"method.name={method}", "train.steps=1", "train.batch_size=4",
        "data.max_length=96", "train.learning_rate=1e-3", f"output_dir={tmp_path / method}"])
    assert (run / "reference_logps.safetensors").exists() == precomputed
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_a_reference_run_is_continued_and_compared_with(tiny, data, tmp_path):
    """objective.reference: the policy starts from that adapter (so DPO starts at log 2
    again although the adapter is not zero) and is compared with it."""
    trained = _train(tiny, data["plain"], tmp_path, "dpo", "preference", 3, "sft")
    assert trained[-1]["rewards/margins"] > 0
    again = _train(tiny, data["plain"], tmp_path, "dpo", "preference", 1, "dpo",
                   f"objective.reference={tmp_path / 'sft'}")
    assert again[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert again[0]["logps/chosen"] == pytest.approx(trained[-1]["logps/chosen"], abs=0.5)
    with pytest.raises(JftError, match="holds a lora adapter.*method.name: lora"):
        _train(tiny, data["plain"], tmp_path, "dpo", "preference", 1, "wrong",
               f"objective.reference={tmp_path / 'sft'}", "method.name=ia3")


def _frequency_of_colon(model_dir, adapter=None, temperature=0.07) -> float:
    """The probability, at temperature 0.07, that the first completion token is ':'."""
    model = jft.load(str(model_dir), adapter=adapter) if adapter else jft.load(str(model_dir))
    colon = model.tokenizer.encode(":", add_special_tokens=False)[0]
    probs = []
    for i in range(16):
        ids = model.encode_prompt(f"Say something {i}:")
        logits = np.asarray(model.logits(np.array([ids]))[0, -1], np.float64) / temperature
        probs.append(np.exp(logits[colon] - np.logaddexp.reduce(logits)))
    return float(np.mean(probs))


def test_grpo_raises_the_frequency_of_the_rewarded_token(tiny, data, tmp_path, monkeypatch):
    (tmp_path / "colon_reward.py").write_text(
        "def first(prompt, completion, example):\n"
        "    return float(completion.startswith(':'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from jft.inference.generation import _generate

    compiled = _generate._cache_size()
    records = _train(tiny, data["prompts"], tmp_path, "grpo", "prompt_completion", 8, "grpo",
                     "objective.reward=colon_reward:first", "objective.temperature=0.07",
                     "objective.max_new_tokens=1", "objective.group_size=8",
                     "train.optimizer=sgd", "train.learning_rate=2.0",
                     "train.schedule=constant")
    for key in ("reward", "reward_std", "kl", "completions/mean_length",
                "rewards/colon_reward:first/mean"):
        assert key in records[-1]
    assert _generate._cache_size() == compiled + 1  # fixed shapes: sampling compiled once
    before, after = _frequency_of_colon(tiny), _frequency_of_colon(tiny, tmp_path / "grpo")
    assert after > before + 0.05, (before, after)


def test_grpo_exact_match_rewards_reference_answers_and_bad_rewards_are_one_line(
        tiny, data, tmp_path):
    records = _train(tiny, data["prompts"], tmp_path, "grpo", "prompt_completion", 1, "em",
                     "objective.max_new_tokens=2", "objective.group_size=2")
    assert records[0]["rewards/exact_match/mean"] == 0.0  # a random model never says " :"
    with pytest.raises(JftError, match="objective.reward.*no_such_module.*cannot import"):
        _train(tiny, data["prompts"], tmp_path, "grpo", "prompt_completion", 1, "bad",
               "objective.reward=no_such_module:f")
    with pytest.raises(JftError, match="objective.pattern"):
        _train(tiny, data["prompts"], tmp_path, "grpo", "prompt_completion", 1, "bad",
               "objective.reward=regex")


def test_grpo_resumes_exactly_even_between_a_rollouts_updates(tiny, data, tmp_path):
    """The sampling key of rollout n is (seed, n) and the prompt order is the data state's;
    with iterations 2 a checkpoint after step 3 falls between rollout 2's two updates and
    keeps that rollout. A run stopped there continues with exactly the losses of a run
    without the stop, and the second update on a rollout clips (ρ ≠ 1)."""
    options = ["objective.max_new_tokens=2", "objective.group_size=4",
               "objective.reward=regex", "objective.pattern=e", "objective.iterations=2",
               "objective.epsilon=0.01", "checkpoint.every=3", "train.schedule=constant",
               "train.learning_rate=0.05"]
    straight = _train(tiny, data["prompts"], tmp_path, "grpo", "prompt_completion", 4,
                      "straight", *options)
    _train(tiny, data["prompts"], tmp_path, "grpo", "prompt_completion", 3, "stopped",
           *options)
    resumed = _train(tiny, data["prompts"], tmp_path, "grpo", "prompt_completion", 4,
                     "stopped", *options)
    for key in ("loss", "reward", "kl", "clip_ratio/region_mean"):
        assert [r[key] for r in resumed] == [r[key] for r in straight]
    assert [r["reward"] for r in straight[:2]] == [straight[0]["reward"]] * 2  # one rollout
    assert straight[0]["clip_ratio/region_mean"] == 0
    assert max(r["clip_ratio/region_mean"] for r in straight[1::2]) > 0
