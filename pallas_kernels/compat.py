"""Where and how a Pallas kernel runs: platform, interpret mode, compiler params.

The names here moved between JAX releases (see ../shared/research/pallas.md): Triton's
`CompilerParams` and TPU's `CompilerParams` both exist from 0.6.2 on, and from 0.9 a
GPU `pallas_call` without compiler params goes to Mosaic GPU rather than Triton, so
GPU kernels here always pass Triton's params explicitly. Triton is deprecated in 0.11
but still present; a jaxlib without it makes `pallas` unavailable on GPU (the XLA
reference path still runs).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.experimental.pallas import tpu as pltpu

try:
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # a future jaxlib without the Triton backend
    pltriton = None

# TPU vector registers are 8 sublanes x 128 lanes (32-bit); a block's last two dims must
# be multiples of (8, 128) or whole dims. Triton's tl.dot needs every dim >= 16.
TPU_LANES = 128
TPU_SUBLANES = 8
TRITON_MIN_DOT = 16


def platform() -> str:
    """'cpu', 'gpu' or 'tpu': the default backend kernels are built for."""
    name = jax.default_backend()
    return "gpu" if name in ("gpu", "cuda", "rocm") else name


def interpret_default() -> bool:
    """On CPU a Pallas kernel can only run in interpret mode (the HLO interpreter)."""
    return platform() == "cpu"


def compiler_params(target: str | None = None, *, dimension_semantics: Sequence[str] = (),
                    num_warps: int = 4, num_stages: int = 2):
    """The backend's compiler params for `pl.pallas_call`, or None on CPU.

    target: 'tpu', 'gpu' (Triton) or 'cpu'; default: this machine's platform. Pass it
    explicitly to lower for another platform (tests export kernels for TPU and CUDA).
    dimension_semantics: per grid axis, 'parallel' or 'arbitrary' (TPU only; an axis
    that carries an accumulator must be 'arbitrary').
    """
    target = target or platform()
    if target == "tpu":
        return pltpu.CompilerParams(dimension_semantics=tuple(dimension_semantics) or None)
    if target == "gpu":
        if pltriton is None:
            raise RuntimeError("this jaxlib has no Pallas Triton backend; use kernels: xla")
        return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return None


def pallas_supported(target: str | None = None) -> bool:
    """Whether Pallas kernels can be compiled (not interpreted) for `target`."""
    target = target or platform()
    return target == "tpu" or (target == "gpu" and pltriton is not None)


def tpu_tile(dim: int, preferred: int) -> int:
    """The largest multiple of 128 <= `preferred` dividing `dim`, else all of `dim`: a
    legal TPU block dim (Mosaic's rule) that never straddles the array's edge, so
    nothing needs masking or padding."""
    if dim % TPU_LANES:
        return dim
    tile = max(TPU_LANES, min(preferred, dim) // TPU_LANES * TPU_LANES)
    while dim % tile:
        tile -= TPU_LANES
    return tile
