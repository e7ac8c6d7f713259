"""`python -m jft.merge` and `jft.merge` end to end on a tiny Llama: task arithmetic equals
stacking the adapters, negation undoes a task vector, mixed methods (LoRA + SpIEL) merge
as task vectors, LoRA merges in ΔW space equal PEFT's `*_svd` merges at full rank, every
output format loads back, the recipe is recorded, and bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import jft
from jft.errors import run_cli
from jft.formats.jft_adapter import save_jft_adapter
from jft.merge import main
from jft.peft import create
from tests.hf_reference import save_hf_model, save_tiny_smollm2

IDS = [[3, 7, 1, 12, 5, 9, 2, 30]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny HF Llama, two LoRA adapters and a SpIEL delta over it (random, non-zero), as
    jft adapter directories."""
    directory = tmp_path_factory.mktemp("merge")
    save_tiny_smollm2(directory / "base", intermediate_size=48)  # a real tokenizer, for --eval
    save_hf_model("qwen2", directory / "other")
    model = jft.load(directory / "base", dtype="float32", compute_dtype="float32")
    adapters = {}
    for i, (name, method, options) in enumerate([
            ("a", "lora", dict(r=4, alpha=8, targets=["q_proj", "v_proj"])),
            ("b", "lora", dict(r=4, alpha=4, targets=["q_proj", "v_proj", "down_proj"])),
            ("sparse", "spiel", dict(count=300, targets=["q_proj", "down_proj"])),
            ("sparse2", "spiel", dict(count=200, targets=["q_proj", "v_proj"]))]):
        _, adapter = create(method, jax.random.key(i), model.params, model.config, **options)
        key = jax.random.key(10 + i)
        delta = jax.tree.map(lambda x: x, adapter.delta)
        if method == "lora":
            for entry in delta["layers"].values():
                key, sub = jax.random.split(key)
                entry["b"] = 0.3 * jax.random.normal(sub, entry["b"].shape)
        else:
            for entry in delta["layers"].values():
                key, sub = jax.random.split(key)
                entry["values"] = 0.05 * jax.random.normal(sub, entry["values"].shape)
        path = directory / name
        path.mkdir()
        save_jft_adapter(adapter.with_delta(delta), model.config, path, str(directory / "base"))
        adapters[name] = path
    return directory, model, adapters


def _merge(capsys, *args):
    code = run_cli(main, [str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _logits(model_path, adapter=None):
    return np.asarray(jft.load(model_path, dtype="float32", compute_dtype="float32",
                               adapter=adapter).logits(IDS))


def test_task_arithmetic_equals_stacking_and_every_format_loads(setup, tmp_path, capsys):
    directory, _, adapters = setup
    base = directory / "base"
    stacked = _logits(base, [adapters["a"], adapters["b"], adapters["sparse"]])
    inputs = ["--inputs", adapters["a"], adapters["b"], adapters["sparse"]]
    for fmt in ("jft", "merged"):
        out = tmp_path / f"linear-{fmt}"
        code, _, err = _merge(capsys, "--model", base, *inputs, "--method", "linear",
                              "--out", out, "--format", fmt, "--dtype", "fp32")
        assert code == 0, err
        merged = _logits(out) if fmt == "merged" else _logits(base, out)
        np.testing.assert_allclose(merged, stacked, atol=2e-5)
        recipe = json.loads((out / "merge_recipe.json").read_text())
        assert recipe["method"] == "linear" and len(recipe["inputs"]) == 3
        assert all(len(i["sha256"]) == 16 for i in recipe["inputs"])
    # LoRA inputs only: cat is exact, and svd at full rank too; both write PEFT adapters.
    lora_stack = _logits(base, [adapters["a"], adapters["b"]])
    for method, extra in (("cat", []), ("svd", ["--svd-rank", "16"])):
        out = tmp_path / method
        code, _, err = _merge(capsys, "--model", base, "--inputs", adapters["a"],
                              adapters["b"], "--method", method, *extra, "--out", out,
                              "--format", "peft")
        assert code == 0, err
        assert (out / "adapter_config.json").exists()
        np.testing.assert_allclose(_logits(base, out), lora_stack, atol=2e-5)


def test_sparse_deltas_sum_to_a_sparse_delta_applied_exactly(setup, tmp_path, capsys):
    """Composable sparse fine-tuning: the sum of two SpIEL deltas is written as one sparse
    delta (not densified) and equals the two stacked."""
    directory, _, adapters = setup
    base = directory / "base"
    out = tmp_path / "sum"
    code, _, err = _merge(capsys, "--model", base, "--inputs", adapters["sparse"],
                          adapters["sparse2"], "--weights", "1", "0.5", "--method", "linear",
                          "--out", out, "--format", "jft")
    assert code == 0, err
    written = json.loads((out / "jft_adapter.json").read_text())
    assert written["method"] == "sparse_delta"
    assert set(written["options"]["targets"]) == {"q_proj", "v_proj", "down_proj"}
    half = tmp_path / "half"
    _merge(capsys, "--model", base, "--inputs", adapters["sparse2"], "--weights", "0.5",
           "--method", "linear", "--out", half, "--format", "jft")
    np.testing.assert_allclose(_logits(base, out), _logits(base, [adapters["sparse"], half]),
                               atol=2e-5)


def test_a_negated_task_vector_undoes_the_task(setup, tmp_path, capsys):
    directory, _, adapters = setup
    base = directory / "base"
    # A merged model of task a, then a minus its own task vector: the base again.
    tuned = tmp_path / "tuned"
    assert _merge(capsys, "--model", base, "--inputs", adapters["a"], "--method", "linear",
                  "--out", tuned, "--format", "merged", "--dtype", "fp32")[0] == 0
    undone = tmp_path / "undone"
    code, _, err = _merge(capsys, "--model", base, "--inputs", tuned, adapters["a"],
                          "--weights", "1", "-1", "--method", "linear", "--out", undone,
                          "--format", "merged", "--dtype", "fp32")
    assert code == 0, err
    np.testing.assert_allclose(_logits(undone), _logits(base), atol=1e-4)
    assert np.abs(_logits(tuned) - _logits(base)).max() > 1e-2


@pytest.mark.parametrize("method, peft_name, density", [
    ("ties", "ties_svd", 0.5), ("magnitude_prune", "magnitude_prune_svd", 0.3),
    ("linear", "svd", 1.0)])
def test_lora_merges_in_delta_space_match_peft_at_full_rank(tmp_path, method, peft_name,
                                                          density):
    """PEFT's `*_svd` merges two LoRAs' ΔW with the same rule, then factors to `svd_rank`:
    at full rank that is the merged ΔW itself."""
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    hf = transformers.LlamaForCausalLM(config)
    hf.save_pretrained(tmp_path / "base")
    model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), "a1")
    model.add_adapter("a2", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    weights = [0.7, 1.2]
    model.save_pretrained(tmp_path / "adapters", selected_adapters=["a1", "a2"])
    model.add_weighted_adapter(["a1", "a2"], weights, "m", combination_type=peft_name,
                               svd_rank=32, density=density)
    inputs = [tmp_path / "adapters" / name for name in ("a1", "a2")]
    result = jft.merge(tmp_path / "base", inputs, method, weights, density=density)
    for layer in range(2):
        q = model.base_model.model.model.layers[layer].self_attn.q_proj
        expected = (q.lora_B["m"].weight @ q.lora_A["m"].weight).detach().numpy()
        expected *= q.scaling["m"]
        ours = result.vector[("layers", "q_proj")][layer]  # [in, N, H] in jft's layout
        np.testing.assert_allclose(ours.reshape(32, -1).T, expected, atol=1e-5)


@pytest.mark.parametrize("args, flag", [
    (["--inputs", "{a}", "/nonexistent"], "/nonexistent"),
    (["--inputs", "{a}", "{b}", "--weights", "1"], "--weights"),
    (["--inputs", "{a}", "{b}", "--method", "ties", "--density", "0"], "--density"),
    (["--inputs", "{a}", "{sparse}", "--method", "svd"], "{sparse}"),
    (["--inputs", "{a}", "{other}"], "{other}"),
    (["--inputs", "{a}", "{b}", "--method", "ties", "--format", "peft"], "--format"),
])
def test_bad_input_is_one_line_and_writes_nothing(setup, tmp_path, capsys, args, flag):
    directory, _, adapters = setup
    other = directory / "other"
    names = {k: str(v) for k, v in adapters.items()} | {"other": str(other)}
    args = [a.format(**names) for a in args]
    if "--method" not in args:
        args += ["--method", "linear"]
    if "--format" not in args:
        args += ["--format", "jft"]
    out = tmp_path / "out"
    code, _, err = _merge(capsys, "--model", directory / "base", *args, "--out", out)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and flag.format(**names) in err, err
    assert not out.exists() and not Path(str(out) + ".partial").exists()


def test_an_out_that_cannot_be_created_is_refused_before_loading(setup, tmp_path, capsys,
                                                                 monkeypatch):
    directory, _, adapters = setup
    monkeypatch.setattr(jft, "load", lambda *a, **k: pytest.fail("loaded the model"))
    (tmp_path / "file").write_text("")
    code, _, err = _merge(capsys, "--model", directory / "base", "--inputs", adapters["a"],
                          "--method", "linear", "--format", "jft", "--out",
                          tmp_path / "file" / "out")
    assert code == 2 and err == (f"error: --out {tmp_path / 'file' / 'out'}: cannot create it "
                                 f"({tmp_path / 'file'} is a file, not a directory)\n")


def test_compress_reports_bytes_and_loss_and_merges_back(setup, tmp_path, capsys):
    directory, _, adapters = setup
    base = directory / "base"
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": f"{i} {i + 1} {i + 2}"}) + "\n"
                            for i in range(8)))
    out = tmp_path / "small"
    code, stdout, err = _merge(capsys, "--model", base, "--inputs", adapters["a"], "--method",
                               "compress", "--density", "0.3", "--eval", data,
                               "--eval-format", "text", "--out", out, "--format", "jft")
    assert code == 0, err
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["compressed_bytes"] < report["dense_bytes"] / 10
    assert np.isfinite(report["eval_loss_before"]) and np.isfinite(report["eval_loss_after"])
    merged = tmp_path / "back"
    assert _merge(capsys, "--model", base, "--inputs", out, "--method", "linear", "--out",
                  merged, "--format", "merged", "--dtype", "fp32")[0] == 0
    assert np.abs(_logits(merged) - _logits(base)).max() > 1e-4  # the vector applies
