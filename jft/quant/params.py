"""Which of a model's params are quantized, and how a linear's weight is laid out then.

A linear site's weight is quantized as the matrix [*out, in] (its input dims flattened
last, the layout of an HF or GGUF checkpoint's [out, in] tensor with the output dims
split), so blocks run along the contracted axis, as in bitsandbytes and GGUF: a
checkpoint's rows quantize as they are read, and a GGUF file's Q8_0 / Q4_0 rows are
kept byte for byte. The codes and scales keep the weight's logical axes (the input
axes merged into their first), so a quantized base shards as the float one does.
Norms and biases stay float; the embedding (and an untied head) only with
`embeddings=True`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jft.errors import JftError
from jft.models.sites import LinearSite
from jft.quant.formats import BLOCK_SIZES, QUANTIZE_CHOICES
from jft.quant.tensor import QuantizedTensor, dequantize, is_quantized

EMBEDDINGS = ("embed", "lm_head")


@dataclasses.dataclass(frozen=True)
class QuantizeSpec:
    """How a base is quantized as it loads (the `quantize*` config keys).

    format: nf4, fp4 or int8; block: elements per scale; double_quant: quantize the
    4-bit formats' scales too (QLoRA's default); embeddings: the embedding table and an
    untied output head as well (not in QLoRA, where they stay 16-bit).
    From a GGUF file, Q8_0 and Q4_0 tensors are kept as they are and the others
    (K-quants, F16) are converted to `format`.
    """

    format: str = "nf4"
    block: int = 64
    double_quant: bool = True
    embeddings: bool = False

    def __post_init__(self):
        if self.format not in QUANTIZE_CHOICES:
            raise JftError(f"quantize={self.format!r}; valid: none, "
                           f"{', '.join(QUANTIZE_CHOICES)}")
        if self.block not in BLOCK_SIZES:
            raise JftError(f"quantize_block={self.block}; valid: "
                           f"{', '.join(map(str, BLOCK_SIZES))}")

    @property
    def double_quantizes(self) -> bool:
        return self.double_quant and self.format in ("nf4", "fp4")

    def quantizes(self, path: tuple[str, ...], sites: dict[str, LinearSite]) -> bool:
        """Whether the leaf at `path` (("layers", "q_proj"), ("embed",)) is quantized."""
        if path[0] == "layers":
            return path[-1] in sites
        return self.embeddings and path[-1] in EMBEDDINGS

    def quantize(self, matrix: np.ndarray, group_ndim: int = 0) -> QuantizedTensor:
        from jft.quant.tensor import quantize

        return quantize(matrix, self.format, self.block, self.double_quantizes, group_ndim)


def from_setting(quantize: str | QuantizeSpec | None, block: int = 64,
                 double_quant: bool = True, embeddings: bool = False) -> QuantizeSpec | None:
    """`jft.load(quantize=...)`'s argument as a spec (None or "none": no quantization)."""
    if quantize is None or quantize == "none":
        return None
    if isinstance(quantize, QuantizeSpec):
        return quantize
    return QuantizeSpec(quantize, block, double_quant, embeddings)


def quantize_like(settings: QuantizedTensor, matrix: np.ndarray) -> QuantizedTensor:
    """`matrix` [layers, *out, in] quantized as the stacked `settings` is (its format,
    block and double quantization), each layer on its own."""
    from jft.quant.tensor import quantize

    return quantize(matrix, settings.format, settings.block, settings.double_quantized,
                    group_ndim=1)


# ---------------------------------------------------------------- a site's weight


def weight_to_matrix(site: LinearSite, weight, lead: int = 0):
    """A weight [*lead, stored layout] as the matrix [*lead, *out, in] quantization
    blocks along (NumPy or JAX)."""
    in_out = site.to_in_out(weight, lead)
    n_in, n_out = len(site.in_letters), len(site.out_letters)
    order = (*range(lead), *range(lead + n_in, lead + n_in + n_out), *range(lead, lead + n_in))
    out_first = in_out.transpose(order)
    return out_first.reshape(*out_first.shape[:lead + n_out], -1)


def matrix_to_weight(site: LinearSite, matrix, in_dims: tuple[int, ...], lead: int = 0):
    """Inverse of `weight_to_matrix`; `in_dims`: the input dims (`site.dims(config)[0]`)."""
    n_in, n_out = len(in_dims), len(site.out_letters)
    split = matrix.reshape(*matrix.shape[:-1], *in_dims)
    order = (*range(lead), *range(lead + n_out, lead + n_out + n_in), *range(lead, lead + n_out))
    return site.from_in_out(split.transpose(order), lead)


def dequantize_weight(site: LinearSite, weight: QuantizedTensor, in_dims: tuple[int, ...],
                      dtype, lead: int = 0) -> jax.Array:
    """A quantized site weight as the float weight in its stored layout."""
    return matrix_to_weight(site, dequantize(weight, dtype), in_dims, lead)


def matrix_axes(site: LinearSite) -> tuple[str, ...]:
    """Logical axes of the stacked matrix [layers, *out, in]: the weight's, the input
    axes merged into their first."""
    return ("layers", *site.out_axes, site.in_axes[0])


def component_axes(path: tuple[str, ...]) -> tuple[str | None, ...]:
    """Logical axes of one array of a quantized leaf, by its path: ("layers", "q_proj",
    "codes"), ("embed", "scales")."""
    from jft.models.sites import declared_sites
    from jft.models.transformer import PARAM_AXES

    *leaf, field = path
    sites = {site.name: site for site in declared_sites()}
    axes = matrix_axes(sites[leaf[-1]]) if leaf[0] == "layers" else PARAM_AXES[leaf[-1]]
    return _field_axes(axes)[field]


def quantized_axes(tensor: QuantizedTensor, axes: tuple[str, ...]) -> QuantizedTensor:
    """The logical axes of each array of `tensor`, whose float array has `axes`."""
    fields = _field_axes(axes)
    return dataclasses.replace(
        tensor, codes=fields["codes"], scales=fields["scales"],
        scale_absmax=None if tensor.scale_absmax is None else fields["scale_absmax"],
        scale_offset=None if tensor.scale_offset is None else fields["scale_offset"])


def _field_axes(axes: tuple[str, ...]) -> dict[str, tuple[str | None, ...]]:
    """Codes and scales follow the float array's axes; double quantization's second
    level, a short vector per layer, is replicated along it."""
    lead = axes[:1] if axes[0] == "layers" else ()
    return {"codes": axes, "scales": axes, "scale_absmax": (*lead, None), "scale_offset": lead}


# ---------------------------------------------------------------- whole trees


def is_quantized_tree(params: Any) -> bool:
    return any(is_quantized(leaf) for leaf in jax.tree.leaves(params, is_leaf=is_quantized))


def dequantize_params(params: dict, config, dtype=jnp.float32) -> dict:
    """`params` with every quantized leaf back as a float array in its stored layout
    (what a merged export and the data-driven LoRA inits read)."""
    from jft.models.sites import linear_sites

    if not is_quantized_tree(params):
        return params
    sites = {site.name: site for site in linear_sites(config)}
    layers = {
        key: (dequantize_weight(sites[key], value, sites[key].dims(config)[0], dtype, lead=1)
              if is_quantized(value) else value)
        for key, value in params["layers"].items()
    }
    top = {key: dequantize(value, dtype) if is_quantized(value) else value
           for key, value in params.items() if key != "layers"}
    return {**top, "layers": layers}


def quantized_bytes(params: Any) -> int:
    """Bytes of every array of `params`, quantized leaves as stored."""
    return sum(leaf.nbytes for leaf in jax.tree.leaves(params))


def rows(tensor: QuantizedTensor, indices: jax.Array, dtype) -> jax.Array:
    """Rows `indices` (any shape) of a quantized 2-D table [V, D], dequantized: an
    embedding lookup that never dequantizes the whole table."""
    scales = tensor.scales
    if tensor.double_quantized:  # the second level is per table: dequantize it whole (V D / 64)
        from jft.quant.tensor import dequantize_scales

        scales = dequantize_scales(scales, tensor.scale_absmax, tensor.scale_offset)
    picked = QuantizedTensor(jnp.take(tensor.codes, indices, axis=0),
                             jnp.take(scales, indices, axis=0), None, None, tensor.format,
                             tensor.block, tensor.columns)
    return dequantize(picked, dtype)


def error_of(reference: np.ndarray, tensor: QuantizedTensor) -> float:
    """Relative RMS error of `tensor` against the float values it stands for."""
    values = np.asarray(dequantize(tensor))
    norm = math.sqrt(float(np.mean(np.square(reference, dtype=np.float64))))
    err = math.sqrt(float(np.mean(np.square(values - reference, dtype=np.float64))))
    return err / norm if norm else 0.0
