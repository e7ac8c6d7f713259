"""Active learning with LoRA (`python -m jft.select active`, STAR): the rounds, the
uncertainty against transformers, and STAR's calibration (weight decay on B alone)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from jft.select.active import ActiveLearning, load_active_config
from tests.hf_reference import save_tiny_smollm2

DATES = [("1969-07-20", "20/07/1969"), ("2001-02-03", "03/02/2001"), ("1987-11-30", "30/11/1987"),
         ("2024-06-01", "01/06/2024"), ("1955-03-14", "14/03/1955"), ("2010-10-10", "10/10/2010"),
         ("1999-12-31", "31/12/1999"), ("2020-01-05", "05/01/2020"), ("1975-08-19", "19/08/1975"),
         ("2033-04-22", "22/04/2033")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("active")
    model = save_tiny_smollm2(root / "model")
    pool = root / "pool.jsonl"
    pool.write_text("".join(json.dumps({"prompt": f"Rewrite the date {iso} as DD/MM/YYYY. "
                                        "Answer:", "completion": f" {dmy}"}) + "\n"
                            for iso, dmy in DATES))
    return root, model, pool


def write_config(root, model, pool, name, **changes):
    raw = {"model": str(model), "pool": str(pool), "initial": 3, "per_round": 2, "rounds": 3,
           "epochs": 1, "mc_samples": 2, "max_new_tokens": 4, "max_length": 48,
           "output_dir": str(root / name),
           "train": {"method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1,
                                "targets": ["q_proj", "v_proj"]},
                     "data": {"eval": str(pool), "max_length": 48},
                     "train": {"batch_size": 2, "learning_rate": 1e-3, "weight_decay": 0.5,
                               "weight_decay_on": ["b"]},
                     "eval": {"generate": True, "max_new_tokens": 4}}, **changes}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_star_rounds_buy_unlabelled_records_by_dynamic_uncertainty(tiny):
    root, model, pool = tiny
    config = load_active_config(str(write_config(root, model, pool, "star")))
    results = ActiveLearning(config).run()
    rounds = results["rounds"]
    assert [r["labelled"] for r in rounds] == [3, 5, 7]
    assert all("eval_exact_match" in r and "eval_loss" in r for r in rounds)
    lines = pool.read_bytes().splitlines(keepends=True)
    first = np.sort(np.random.default_rng(0).choice(len(lines), 3, replace=False))
    labelled = list(first)
    for number, entry in enumerate(rounds[:-1], 1):
        folder = root / "star/rounds" / f"{number:02d}"
        assert (folder / "labelled.jsonl").read_bytes() == b"".join(
            lines[i] for i in sorted(labelled))
        # STAR's score: w·minmax(U_full) + (1 - w)·minmax(U_base), w = round / rounds.
        rows, scores = np.load(folder / "scores.npy")
        rows = rows.astype(int)
        assert set(rows) == set(range(len(lines))) - set(labelled)
        top = rows[np.lexsort((rows, -scores))][:2]
        assert sorted(top) == entry["bought"]
        base = np.load(root / "star/base_uncertainty.npy")[rows]
        base = (base - base.min()) / (base.max() - base.min())
        full = (scores - (1 - number / 3) * base) / (number / 3)
        assert full.min() == pytest.approx(0, abs=1e-9) and full.max() == pytest.approx(1)
        labelled += entry["bought"]
    assert "bought" not in rounds[-1]
    # Run again: every round is on record, nothing is trained or bought again.
    assert ActiveLearning(config).run() == results


def test_random_strategy_is_a_seeded_baseline_with_the_same_label_counts(tiny):
    root, model, pool = tiny
    runs = [ActiveLearning(load_active_config(str(write_config(
        root, model, pool, name, strategy="random", rounds=2)))).run() for name in ("r1", "r2")]
    assert runs[0]["rounds"][0]["bought"] == runs[1]["rounds"][0]["bought"]
    assert [r["labelled"] for r in runs[0]["rounds"]] == [3, 5]


def test_uncertainty_of_a_completion_equals_transformers(tiny):
    import torch
    import transformers

    import jft
    from jft.select.features import target_uncertainty
    from jft.select.pool import read_pool

    root, model_dir, pool_path = tiny
    model = jft.load(model_dir, dtype="float32")
    pool = read_pool(pool_path, "auto", model.tokenizer, 48)
    values = target_uncertainty(model.config, model.params, (), pool.examples, batch_size=4)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    for index in range(3):
        tokens, mask = pool.examples.arrays(index)
        with torch.no_grad():
            logits = hf(torch.tensor(tokens[None].astype(np.int64))).logits[0, :-1].double()
        logp = torch.log_softmax(logits, -1)
        targets = torch.tensor(mask[1:])
        nll = -logp.gather(1, torch.tensor(tokens[1:, None].astype(np.int64)))[:, 0]
        entropy = -(logp.exp() * logp).sum(-1)
        assert values["nll"][index] == pytest.approx(float(nll[targets].mean()), rel=1e-4)
        assert values["entropy"][index] == pytest.approx(float(entropy[targets].mean()), rel=1e-4)


def test_monte_carlo_dropout_passes_vary_only_with_the_lora_dropout(tiny):
    import jft
    from jft.peft.factory import create
    from jft.select.features import target_uncertainty
    from jft.select.pool import read_pool

    _, model_dir, pool_path = tiny
    model = jft.load(model_dir, dtype="float32")
    pool = read_pool(pool_path, "auto", model.tokenizer, 48)

    def uncertainty(dropout, samples):
        _, adapter = create("lora", jax.random.key(0), model.params, model.config, r=4,
                            alpha=8, dropout=dropout, targets=["q_proj"])
        adapter = adapter.with_delta(jax.tree.map(lambda x: jnp.ones_like(x) * 2.0,
                                                  adapter.delta))
        return target_uncertainty(model.config, model.params, [adapter], pool.examples,
                                  batch_size=4, samples=samples)["nll"]

    np.testing.assert_allclose(uncertainty(0.0, 3), uncertainty(0.0, 1), rtol=1e-7)
    assert np.abs(uncertainty(0.5, 3) - uncertainty(0.5, 1)).max() > 1e-3


def test_weight_decay_on_names_the_leaves_it_decays(tiny):
    import jft
    from jft.peft.factory import create
    from jft.peft.optim import masked_optimizer
    from jft.training.config import TrainSection, build_optimizer

    model = jft.load(tiny[1], dtype="float32")
    _, adapter = create("lora", jax.random.key(0), model.params, model.config, r=4, alpha=8,
                        targets=["q_proj"])
    adapter = adapter.with_delta(jax.tree.map(jnp.ones_like, adapter.delta))
    train = TrainSection(learning_rate=0.1, schedule="constant", weight_decay=0.5,
                         weight_decay_on=["b"], grad_clip=0.0)
    optimizer = masked_optimizer(build_optimizer(train), [adapter])
    zeros = jax.tree.map(jnp.zeros_like, [adapter])
    updates, _ = optimizer.update(zeros, optimizer.init([adapter]), [adapter])
    delta = updates[0].delta["layers"]["q_proj"]
    np.testing.assert_allclose(delta["a"], 0.0)
    np.testing.assert_allclose(delta["b"], -0.1 * 0.5)  # AdamW's decoupled decay: -lr·wd·b


def test_bad_active_configs_are_one_line(tiny, capsys):
    from jft.errors import run_cli
    from jft.select.__main__ import main

    root, model, pool = tiny
    bad = {"strategy": "greedy", "rounds": 0, "mc_samples": 3}
    messages = {"strategy": "strategy: 'greedy'; valid: star, uncertainty, random",
                "rounds": "rounds: 0; expected an integer >= 1",
                "mc_samples": "need the LoRA dropout on"}
    for key, value in bad.items():
        path = write_config(root, model, pool, f"bad-{key}", **{key: value})
        if key == "mc_samples":
            raw = yaml.safe_load(path.read_text())
            raw["train"]["method"]["dropout"] = 0.0
            path.write_text(yaml.safe_dump(raw))
        assert run_cli(main, ["active", str(path)]) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("error: ") and messages[key] in error
    path = write_config(root, model, pool, "bad-decay")
    raw = yaml.safe_load(path.read_text())
    raw["train"]["train"]["weight_decay_on"] = ["B"]
    path.write_text(yaml.safe_dump(raw))
    assert run_cli(main, ["active", str(path)]) == 2
    assert "'B' names no trained leaf of the adapter; its leaves: a, b" in capsys.readouterr().err
