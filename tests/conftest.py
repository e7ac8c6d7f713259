"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest

from jft.formats.loading import load_checkpoint
from tests.hf_reference import save_hf_model

# The slowest files first. Two xdist workers take a file each (pyproject's addopts), and
# a slow file handed out last would keep one worker busy long after the other is done.
SLOW_FIRST = ("test_sharding.py", "test_continual_cli.py", "test_train_cli.py", "test_serve.py",
              "test_export.py", "test_bundled_models.py", "test_delta_axes.py",
              "test_notebooks.py", "test_sharded_loading.py",
              "test_lora_inits.py", "test_peft_lora.py", "test_peft_lisa_hft.py",
              "test_moe.py", "test_mixlora_quickstart.py", "test_select.py",
              "test_select_active.py")


def pytest_collection_modifyitems(items):
    rank = {name: position for position, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(transformers model, jft ModelConfig in fp32, jft params) of one tiny random Llama."""
    directory = tmp_path_factory.mktemp("llama")
    hf_model = save_hf_model("llama", directory)
    checkpoint = load_checkpoint(directory, dtype="float32")
    return hf_model, checkpoint.config.replace(dtype="float32"), checkpoint.params


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory):
    """jft's wheel, built from this checkout and installed non-editable on its own."""
    from tests.isolated_install import build_and_install

    return build_and_install(tmp_path_factory.mktemp("wheel"))
