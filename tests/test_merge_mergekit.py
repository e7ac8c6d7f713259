"""Task-vector merges of two tiny fine-tuned HF checkpoints against mergekit's: task
arithmetic (a negative weight too), TIES, Breadcrumbs and Breadcrumbs-TIES give the same
tensors. DARE and DELLA draw torch's random masks, which NumPy cannot reproduce; their
rules are checked against NumPy in tests/test_merge_tensors.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import jft
from tests.hf_reference import save_hf_model

pytest.importorskip("mergekit")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Llama and two fine-tunes of it: the base plus different random changes."""
    import transformers

    directory = tmp_path_factory.mktemp("mergekit")
    save_hf_model("llama", directory / "base")
    for seed, name in ((1, "ft1"), (2, "ft2")):
        model = transformers.AutoModelForCausalLM.from_pretrained(directory / "base")
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
        model.save_pretrained(directory / name)
    return directory


def _mergekit(directory: Path, method: str, models: list[dict], out: Path, **parameters):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = {"merge_method": method, "base_model": str(directory / "base"),
              "models": [{"model": str(directory / m.pop("name")), "parameters": m}
                         for m in models],
              "dtype": "float32", "parameters": parameters}
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(config))),
              str(out), MergeOptions(copy_tokenizer=False, write_model_card=False,
                                     quiet=True))
    return jft.load(out, dtype="float32", compute_dtype="float32").params


@pytest.mark.parametrize("method, ours, weights, options", [
    ("task_arithmetic", "linear", (0.6, -0.3), {}),
    ("ties", "ties", (1.0, 1.0), {"density": 0.4}),
    ("breadcrumbs", "breadcrumbs", (0.7, 0.5), {"density": 0.5, "gamma": 0.05}),
    ("breadcrumbs_ties", "breadcrumbs_ties", (1.0, 1.0), {"density": 0.5, "gamma": 0.05}),
])
def test_merges_equal_mergekits(checkpoints, tmp_path, method, ours, weights, options):
    per_model = {k: v for k, v in options.items() if k in ("density", "gamma")}
    expected = _mergekit(checkpoints, method,
                         [{"name": n, "weight": w, **per_model}
                          for n, w in zip(("ft1", "ft2"), weights, strict=True)],
                         tmp_path / "mergekit")
    result = jft.merge(checkpoints / "base", [checkpoints / "ft1", checkpoints / "ft2"], ours,
                       list(weights), **options)
    flat_expected = dict(_leaves(expected))
    for key, leaf in _leaves(result.params):
        np.testing.assert_allclose(leaf, flat_expected[key], atol=1e-6, err_msg=str(key))


def _leaves(tree, prefix=()):
    for name, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*prefix, name))
        else:
            yield (*prefix, name), np.asarray(value, np.float32)
