"""`python -m jft.select`: the random projection, per-example gradients, IFD against
transformers, and the command's outputs (records unchanged, deterministic, errors)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jft.select.__main__ import main
from jft.select.projection import project
from tests.hf_reference import save_tiny_smollm2

DATES = [("1969-07-20", "20/07/1969"), ("2001-02-03", "03/02/2001"), ("1987-11-30", "30/11/1987"),
         ("2024-06-01", "01/06/2024"), ("1955-03-14", "14/03/1955"), ("2010-10-10", "10/10/2010")]
OTHER = [("Spell out 12 in words.", " twelve"), ("Write 'cat' backwards.", " tac"),
         ("What is 2 + 3?", " 5"), ("Uppercase the word dog.", " DOG"),
         ("Give the initials of 'new york'.", " NY"), ("Say something about rain.", " It fell.")]


def records():
    pool = [{"prompt": f"Rewrite the date {iso} as DD/MM/YYYY. Answer:", "completion": f" {dmy}"}
            for iso, dmy in DATES]
    pool += [{"prompt": prompt, "completion": completion, "source": "other"}
             for prompt, completion in OTHER]
    return pool


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, pool.jsonl with odd spacing kept byte for byte, target.jsonl)."""
    root = tmp_path_factory.mktemp("select")
    model = save_tiny_smollm2(root / "model")
    pool = root / "pool.jsonl"
    # Unusual but valid JSON lines (spaces, key order, a unicode escape, a blank line): the
    # subset must copy them exactly, not re-serialise them.
    lines = [json.dumps(r, indent=None, separators=(", ", ":")) for r in records()]
    lines[3] = lines[3].replace('"prompt"', '"prompt" ')
    lines[7] = lines[7].replace("backwards", "backw\\u0061rds")
    pool.write_bytes(("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]) + "\n").encode())
    target = root / "target.jsonl"
    target.write_text("".join(json.dumps({"prompt": f"Rewrite the date {iso} as DD/MM/YYYY. "
                                          "Answer:", "completion": f" {dmy}"}) + "\n"
                              for iso, dmy in [("1999-12-31", "31/12/1999"),
                                               ("2020-01-05", "05/01/2020")]))
    return model, pool, target


def select(tiny, tmp_path, method, *extra, budget="4", out="subset.jsonl"):
    model, pool, target = tiny
    argv = ["--model", str(model), "--pool", str(pool), "--target", str(target), "--method",
            method, "--budget", budget, "--out", str(tmp_path / out), "--max-length", "48",
            *extra]
    assert main(argv) == 0
    scores = [json.loads(line) for line in
              (tmp_path / out).with_name(Path(out).stem + ".scores.jsonl").read_text()
              .splitlines()]
    return tmp_path / out, scores


# ------------------------------------------------------------------ projection


def test_projection_keeps_inner_products_within_the_johnson_lindenstrauss_bound():
    rng = np.random.default_rng(0)
    rows, dim = 12, 2048
    tree = {"a": jnp.asarray(rng.normal(size=(rows, 300, 20)), jnp.float32),
            "b": [jnp.asarray(rng.normal(size=(rows, 7000)) + 0.3, jnp.float32)]}
    flat = np.concatenate([np.asarray(tree["a"]).reshape(rows, -1),
                           np.asarray(tree["b"][0])], axis=1)
    projected = np.asarray(project(tree, dim, seed=3))
    exact, approx = flat @ flat.T, projected @ projected.T
    norms = np.linalg.norm(flat, axis=1)
    # |<Px,Py> - <x,y>| <= eps |x||y| for all pairs with probability 1 - delta when
    # eps = sqrt(8 ln(4 pairs / delta) / dim) (JL for inner products, Rademacher entries).
    pairs, delta = rows * (rows + 1) // 2, 0.01
    eps = np.sqrt(8 * np.log(4 * pairs / delta) / dim)
    error = np.abs(approx - exact) / np.outer(norms, norms)
    assert error.max() < eps
    assert error.max() > 1e-4  # a real projection, not an isometry by accident


def test_projection_is_per_row_and_seeded():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(5, 40000)), jnp.float32)  # more rows than one block
    whole = np.asarray(project({"w": x}, 64, seed=0))
    alone = np.asarray(project({"w": x[2:3]}, 64, seed=0))
    np.testing.assert_allclose(whole[2:3], alone, rtol=1e-4, atol=1e-3)  # summation order
    assert not np.allclose(whole, np.asarray(project({"w": x}, 64, seed=1)))
    assert not np.allclose(whole, np.asarray(project({"v": x}, 64, seed=0)))  # leaf-keyed


# ------------------------------------------------------------------ per-example gradients


def test_per_example_gradients_equal_one_by_one_grad_and_adams_update(tiny):
    import jft
    from jft.objectives.sft import token_losses
    from jft.peft.base import combine, partition
    from jft.peft.factory import create
    from jft.select.features import pad_rows
    from jft.select.gradients import ADAM_EPS, example_gradients
    from jft.select.pool import read_pool

    model = jft.load(tiny[0], dtype="float32")
    pool = read_pool(tiny[1], "auto", model.tokenizer, 48)
    _, adapter = create("lora", jax.random.key(0), model.params, model.config, r=4, alpha=8,
                        targets=["q_proj", "v_proj", "down_proj"])
    noise = iter(jax.random.split(jax.random.key(1), 64))
    adapter = adapter.with_delta(jax.tree.map(
        lambda x: x + 0.1 * jax.random.normal(next(noise), x.shape), adapter.delta))
    rows = np.arange(5)
    batch = pad_rows(pool.examples, rows, 6, 48)  # one padding row
    per_example = example_gradients(model.config, model.params, adapter, batch, None)
    (trainable,), (frozen,) = partition([adapter])
    moments = jax.tree.map(lambda g: jnp.abs(g[0]) * 0.5, per_example)
    adam = example_gradients(model.config, model.params, adapter, batch,
                             (moments, moments, jnp.float32(0.9), jnp.float32(0.99)))
    for row in rows:
        one = {name: value[row:row + 1] for name, value in batch.items()}

        def loss(part, one=one):
            losses, mask = token_losses(model.config, model.params, combine([part], [frozen]),
                                        one)
            return jnp.sum(jnp.where(mask, losses, 0.0)) / mask.sum()

        expected = jax.grad(loss)(trainable).delta
        for got, want in zip(jax.tree.leaves(per_example), jax.tree.leaves(expected),
                             strict=True):
            np.testing.assert_allclose(got[row], want, rtol=1e-4, atol=1e-6)
        for got, g, m in zip(jax.tree.leaves(adam), jax.tree.leaves(expected),
                             jax.tree.leaves(moments), strict=True):
            g, m = np.asarray(g, np.float64), np.asarray(m, np.float64)
            first, second = 0.9 * m + 0.1 * g, 0.99 * m + 0.01 * g * g
            np.testing.assert_allclose(got[row], first / np.sqrt(second + ADAM_EPS), rtol=2e-3,
                                       atol=1e-5)
    assert all(np.all(np.asarray(leaf[5]) == 0) for leaf in jax.tree.leaves(per_example))


# ------------------------------------------------------------------ IFD


def test_ifd_equals_the_ratio_of_transformers_perplexities(tiny, tmp_path):
    import torch
    import transformers

    _, scores = select(tiny, tmp_path, "ifd", "--ifd-max", "100")
    directory = tiny[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory).float().eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    bos = [tokenizer.bos_token_id] if tokenizer("x").input_ids[0] == tokenizer.bos_token_id \
        else []

    def answer_loss(prefix: list[int], answer: list[int]) -> float:
        ids = torch.tensor([prefix + answer])
        with torch.no_grad():
            logits = hf(ids).logits[0, :-1]
        losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        return float(losses[len(prefix) - 1:].mean())

    for record, score in zip(records(), scores, strict=True):
        prompt = bos + tokenizer(record["prompt"], add_special_tokens=False).input_ids
        completion = tokenizer(record["completion"], add_special_tokens=False).input_ids
        alone = tokenizer(record["completion"].lstrip(), add_special_tokens=False).input_ids
        eos = [tokenizer.eos_token_id]
        alone = bos + alone + eos  # its first token is predicted from nothing: not a target
        expected = np.exp(answer_loss(prompt, completion + eos)
                          - answer_loss(alone[:1], alone[1:]))
        assert score["score"] == pytest.approx(expected, rel=1e-4)


# ------------------------------------------------------------------ the command's outputs


def test_subset_lines_are_byte_identical_and_selection_is_deterministic(tiny, tmp_path):
    pool_lines = [line for line in tiny[1].read_bytes().splitlines(keepends=True)
                  if line.strip()]
    subset, scores = select(tiny, tmp_path, "perplexity")
    chosen = [s["index"] for s in scores if s["selected"]]
    assert len(chosen) == 4 and [s["index"] for s in scores] == list(range(len(pool_lines)))
    assert subset.read_bytes() == b"".join(pool_lines[i] for i in sorted(chosen))
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i]["score"], i))
    assert sorted(ranked[:4]) == sorted(chosen)  # the lowest perplexities
    again, _ = select(tiny, tmp_path, "perplexity", out="again.jsonl")
    assert again.read_bytes() == subset.read_bytes()
    for seed in ("0", "1"):
        first, _ = select(tiny, tmp_path, "random", "--seed", seed, out=f"r{seed}a.jsonl")
        second, _ = select(tiny, tmp_path, "random", "--seed", seed, out=f"r{seed}b.jsonl")
        assert first.read_bytes() == second.read_bytes()


def test_embedding_methods_choose_within_budget_with_clusters(tiny, tmp_path):
    _, kmq = select(tiny, tmp_path, "kmq", "--clusters", "3", out="kmq.jsonl")
    assert sum(s["selected"] for s in kmq) == 4
    assert {s["cluster"] for s in kmq} == {0, 1, 2}
    _, got_d = select(tiny, tmp_path, "got-d", "--solver", "emd", out="gotd.jsonl")
    chosen = [s["score"] for s in got_d if s["selected"]]
    assert min(chosen) >= max(s["score"] for s in got_d if not s["selected"])
    subset, dedup = select(tiny, tmp_path, "dedup", "--threshold", "0.9999", budget="100%",
                           out="dedup.jsonl")
    assert 1 <= sum(s["selected"] for s in dedup) <= len(dedup)


def test_less_warms_up_on_the_pool_and_scores_each_checkpoint(tiny, tmp_path, capsys):
    subset, scores = select(tiny, tmp_path, "less", "--dim", "64", "--warmup-fraction", "0.5",
                            "--warmup-epochs", "2", "--warmup-batch-size", "2")
    report = capsys.readouterr().err
    assert "checkpoints 3 (weight" in report and "6 (weight" in report and "Adam" in report
    assert (tmp_path / "subset.jsonl.work/less-warmup/run/checkpoints").is_dir()
    values = [s["score"] for s in scores]
    assert all(-1 <= v <= 1 for v in values) and len(set(values)) == len(values)
    # The run is an adapter: given back with --adapter, it scores the same; with
    # --cache-dir a second run reads the scores the first stored.
    run = str(tmp_path / "subset.jsonl.work/less-warmup/run")
    cache = str(tmp_path / "cache")
    _, again = select(tiny, tmp_path, "less", "--dim", "64", "--adapter", run, "--cache-dir",
                      cache, out="again.jsonl")
    np.testing.assert_allclose([s["score"] for s in again], values, rtol=1e-5, atol=1e-6)
    (stored,) = (tmp_path / "cache").iterdir()
    assert stored.name.startswith("less-dim64-seed0-")
    np.save(stored, np.arange(len(values), dtype=np.float64))  # what the cache says counts
    _, cached = select(tiny, tmp_path, "less", "--dim", "64", "--adapter", run, "--cache-dir",
                       cache, out="cached.jsonl")
    assert [s["score"] for s in cached] == list(range(len(values)))
    # A PEFT adapter is one checkpoint, with plain gradients (no optimiser state).
    from jft.export import main as export

    assert export([str(tmp_path / "subset.jsonl.work/less-warmup/run"), "--out",
                   str(tmp_path / "peft"), "--format", "peft"]) == 0
    capsys.readouterr()
    _, plain = select(tiny, tmp_path, "less", "--dim", "64", "--adapter",
                      str(tmp_path / "peft"), out="plain.jsonl")
    assert "checkpoints adapter (weight 1.000)" in capsys.readouterr().err
    assert [s["score"] for s in plain] != values


def test_other_pool_formats_keep_their_records(tiny, tmp_path):
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    rows = records()
    array = tmp_path / "pool.json"
    array.write_text(json.dumps(rows))
    table = tmp_path / "pool.csv"
    with open(table, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows({"prompt": r["prompt"], "completion": r["completion"]} for r in rows)
    model, _, target = tiny
    for pool, out in ((array, "a.json"), (table, "b.csv")):
        assert main(["--model", str(model), "--pool", str(pool), "--method", "random",
                     "--budget", "0.5", "--out", str(tmp_path / out)]) == 0
    chosen = json.loads((tmp_path / "a.json").read_text())
    assert len(chosen) == 6 and all(r in rows for r in chosen)
    assert "source" not in chosen[0] or chosen[0]["source"] == "other"  # no added nulls
    with open(tmp_path / "b.csv", newline="") as file:
        assert len(list(csv.DictReader(file))) == 6
    pq.write_table(pcsv.read_csv(table), tmp_path / "pool.parquet")
    assert main(["--model", str(model), "--pool", str(tmp_path / "pool.parquet"), "--method",
                 "random", "--budget", "3", "--out", str(tmp_path / "s.parquet")]) == 0
    assert pq.read_table(tmp_path / "s.parquet").num_rows == 3


@pytest.mark.parametrize("change, message", [
    ({"--budget": "0"}, "--budget '0'; expected a count"),
    ({"--budget": "150%"}, "--budget '150%'"),
    ({"--method": "best"}, "--method 'best'; valid: dedup, got-d, ifd, kmq, less"),
    ({"--out": "subset.csv"}, "the subset keeps the pool's format; give a .jsonl path"),
    ({"--target": None, "--method": "got-d"}, "--method got-d scores against a target set"),
    ({"--format": "preference"}, "--format 'preference'; valid: auto, text"),
    ({"--method": "kmq", "--clusters": "many"}, "--clusters 'many'; expected auto or a count"),
    ({"--method": "got-d", "--solver": "magic"}, "--solver 'magic'; valid: sinkhorn, emd"),
    ({"--method": "less", "--warmup-fraction": "1.5"}, "--warmup-fraction 1.5; expected more"),
    ({"--method": "less", "--dim": "100"}, "--dim 100; expected a multiple of 32"),
    ({"--method": "kmq", "--iterations": "3"}, "--iterations > 1 trains between rounds"),
])
def test_bad_input_is_one_line_and_exit_2(tiny, tmp_path, capsys, change, message):
    from jft.errors import run_cli

    model, pool, target = tiny
    options = {"--model": str(model), "--pool": str(pool), "--target": str(target),
               "--method": "random", "--budget": "3", "--out": str(tmp_path / "subset.jsonl"),
               **change}
    argv = [part for key, value in options.items() if value is not None
            for part in (key, value)]
    assert run_cli(main, argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after any status lines
    assert error.startswith("error: ") and message in error


def test_existing_outputs_are_never_overwritten(tiny, tmp_path, capsys):
    from jft.errors import run_cli

    (tmp_path / "subset.scores.jsonl").write_text("keep me\n")
    model, pool, _ = tiny
    argv = ["--model", str(model), "--pool", str(pool), "--method", "random", "--budget", "3",
            "--out", str(tmp_path / "subset.jsonl")]
    assert run_cli(main, argv) == 2
    assert "subset.scores.jsonl exists" in capsys.readouterr().err
    assert (tmp_path / "subset.scores.jsonl").read_text() == "keep me\n"
    assert not (tmp_path / "subset.jsonl").exists()


def test_iterative_kmq_trains_between_rounds_and_reweights_clusters(tiny, tmp_path, capsys):
    import yaml

    model, pool, _ = tiny
    config = tmp_path / "round.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(model),
        "method": {"name": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
        "data": {"format": "prompt_completion", "max_length": 48},
        "train": {"batch_size": 2, "learning_rate": 1e-3}}))
    _, scores = select(tiny, tmp_path, "kmq", "--clusters", "3", "--iterations", "2",
                       "--train-config", str(config), "--max-new-tokens", "4", budget="6")
    report = capsys.readouterr().err
    assert sum(s["selected"] for s in scores) == 6
    weights = [float(w) for w in report.split("final cluster weights ")[1].split()[:3]]
    assert sum(weights) == pytest.approx(1, abs=2e-3) and len(set(weights)) > 1
    round_run = tmp_path / "subset.jsonl.work/kmq-round-1/run"
    assert (round_run / "checkpoints").is_dir()
    first_round = (tmp_path / "subset.jsonl.work/kmq-round-1/data.jsonl").read_bytes()
    assert len(first_round.splitlines()) == 3  # b/N before the first training


def test_cache_dir_reuses_embeddings_and_losses_across_methods(tiny, tmp_path):
    cache = tmp_path / "cache"
    _, first = select(tiny, tmp_path, "perplexity", "--cache-dir", str(cache), out="a.jsonl")
    _, kmq = select(tiny, tmp_path, "kmq", "--cache-dir", str(cache), "--clusters", "2",
                    out="b.jsonl")
    stored = sorted(p.name.split("-")[0] + "-" + p.name.split("-")[1] for p in cache.iterdir())
    assert stored == ["embeddings-pool", "losses-examples"]
    _, again = select(tiny, tmp_path, "perplexity", "--cache-dir", str(cache), out="c.jsonl")
    assert [s["score"] for s in again] == [s["score"] for s in first]
    selected = [s["index"] for s in kmq if s["selected"]]
    np.testing.assert_allclose([kmq[i]["score"] for i in selected],
                               [-np.log(-first[i]["score"]) for i in selected], rtol=1e-6)
