"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest

from jft.checkpoint import load_checkpoint
from tests.hf_reference import save_hf_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(transformers model, jft ModelConfig in fp32, jft params) of one tiny random Llama."""
    directory = tmp_path_factory.mktemp("llama")
    hf_model = save_hf_model("llama", directory)
    checkpoint = load_checkpoint(directory, dtype="float32")
    return hf_model, checkpoint.config.replace(dtype="float32"), checkpoint.params
