"""jft: fine-tune Llama, Qwen and Gemma models in pure JAX."""

from jft import _checkout
from jft.errors import JftError

_checkout.map_sibling_packages(__path__[0])

__version__ = "0.1.0"
__all__ = ["JftError", "load", "merge"]


def load(model, dtype: str = "auto", compute_dtype: str = "auto", adapter=None, rules=None,
         **quantization):
    """Loads a bundled name, an HF directory or a `.gguf` file (with a training run's
    adapter on top, sharded over a mesh with `rules`, its base quantized with
    `quantize="nf4"`, ...); see `jft.api.load`."""
    from jft.api import load as _load

    return _load(model, dtype, compute_dtype, adapter, rules, **quantization)


def merge(model, inputs, method, weights=None, **options):
    """Merges fine-tunes of one base (`python -m jft.merge` from Python): see
    `jft.merging.api.merge` and docs/merging.md."""
    from jft.merging.api import merge as _merge

    return _merge(model, inputs, method, weights, **options)
