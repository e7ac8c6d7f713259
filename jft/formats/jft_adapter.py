"""jft's own adapter format, for every method (and the only one for S²FT, SpIEL, LISA and
HFT, which PEFT cannot express): a directory with `jft_adapter.json` and
`adapter.safetensors`. See docs/formats.md.

The delta is stored in the form that applies to an unmodified base (S²FT's indexed
layout, not its training permutation), one safetensors tensor per leaf, named by its
path in the delta (`layers/q_proj/values`).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from jft.errors import JftError
from jft.formats.safetensors_io import SafetensorsFile
from jft.models import ModelConfig
from jft.storage import save_safetensors

CONFIG_FILE = "jft_adapter.json"
TENSORS_FILE = "adapter.safetensors"
FORMAT_VERSION = 1
# The base's shape, recorded so that an adapter never loads over another model.
_MODEL_FIELDS = ("family", "vocab_size", "embed_dim", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "mlp_dim")


def architecture(model: ModelConfig) -> dict:
    """What an adapter records of its base, to refuse loading over another model."""
    return {name: getattr(model, name) for name in _MODEL_FIELDS}


def check_architecture(saved: dict, model: ModelConfig, where) -> None:
    for name, value in architecture(model).items():
        if saved.get(name) != value:
            raise JftError(f"{where}: the adapter was made for a model with {name}="
                           f"{saved.get(name)!r}, this base has {value!r}")


def is_jft_adapter(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def save_jft_adapter(adapter, model: ModelConfig, directory: Path,
                     base_model: str | None = None) -> None:
    from jft.peft.factory import config_to_options

    tensors = {
        jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(adapter.delta)[0]
    }
    save_safetensors(tensors, Path(directory) / TENSORS_FILE)
    config = {
        "format": "jft-adapter", "version": FORMAT_VERSION, "method": adapter.method,
        "options": config_to_options(adapter.config), "base_model": base_model,
        "model": architecture(model),
    }
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def read_jft_config(directory: Path) -> dict:
    """The jft_adapter.json of a jft adapter directory, a JSON object."""
    from jft.formats.adapters import read_config_object

    return read_config_object(Path(directory) / CONFIG_FILE, "jft adapter")


def read_jft_adapter(directory: Path, model: ModelConfig):
    """(method, config, delta on the host) of a jft adapter directory, refused over a base
    of another architecture. `jft.formats.adapters.load_adapter` places and applies it."""
    from jft.peft import make_config

    directory = Path(directory)
    path = directory / CONFIG_FILE
    config = read_jft_config(directory)
    missing = [key for key in ("method", "options", "model") if key not in config]
    if missing:
        raise JftError(f"{path}: not a jft adapter config (no {missing[0]!r} field)")
    method, options, saved = config["method"], config["options"], config["model"]
    if config.get("version") != FORMAT_VERSION:
        raise JftError(f"{path}: version {config.get('version')!r}; this jft reads version "
                       f"{FORMAT_VERSION}")
    if not isinstance(saved, dict):
        raise JftError(f"{path}: field 'model' is {saved!r}, not an object of architecture "
                       "fields")
    check_architecture(saved, model, path)
    tensors_path = directory / TENSORS_FILE
    if not tensors_path.is_file():
        raise JftError(f"{directory}: no {TENSORS_FILE} beside its {CONFIG_FILE}")
    # jft's own reader: one line naming the file for a corrupt header or truncated data.
    file = SafetensorsFile(tensors_path)
    delta: dict = {}
    for key in file.names():
        value = file.read(key)
        node = delta
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return method, make_config(method, options), delta
