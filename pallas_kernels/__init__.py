"""Pallas kernels for fused low-rank and structured-sparse updates (`jft.pallas_kernels`).

Every kernel sits beside an XLA reference implementation of the same function:

- `lora_linear`: y = x W + s (x A) B, forward and backward fused (no dW);
- `s2ft_linear`: S2FT's trainable block beside the frozen weight, the block's gradient
  and the frozen remainder's dx in one pass over dy;
- `multi_lora`: rows of one batch using different LoRA adapters (grouped for prefill,
  gathered for decode);
- `quant_matmul`: x @ W^T with W a block-quantized frozen weight (nf4, fp4, int8, q8_0,
  q4_0), dequantized tile by tile inside the matmul (forward and dx).

`kernels: auto | pallas | xla` (a run's config key, `ModelConfig.kernels`) chooses
between them. `pallas` forces the kernels (interpret mode on CPU, which is slow and
meant for tests), `xla` the references, and `auto` takes a kernel only on a platform
where `benchmarks/kernels.py` measured it faster than its reference: MEASURED_FASTER
below, which stays empty for a platform until the benchmark has run there.
"""

from __future__ import annotations

from jft.pallas_kernels.compat import platform

KERNEL_SETTINGS = ("auto", "pallas", "xla")

# kernel name -> platforms where its benchmark beat the XLA reference. No GPU or TPU
# measurement has been made yet (benchmarks/results/ and BENCHMARKS.md say when one is).
MEASURED_FASTER: dict[str, frozenset[str]] = {
    "lora_linear": frozenset(),
    "s2ft_linear": frozenset(),
    "multi_lora": frozenset(),
    "quant_matmul": frozenset(),
}


def use_kernel(kernel: str, model) -> bool:
    """Whether `kernel` runs as its fused Pallas kernel in a model of this ModelConfig
    (`model.kernels`). The kernels compute whole arrays on one device, so under a
    multi-device mesh the XLA path runs instead: its einsums are what the sharding rules
    partition."""
    from jft.sharding.logical import active_rules

    rules = active_rules()
    if rules is not None and rules.mesh.size > 1:
        return False
    return use_pallas(kernel, model.kernels)


def use_pallas(kernel: str, setting: str) -> bool:
    """Whether `kernel` runs as its Pallas kernel under the `kernels` setting."""
    if setting not in KERNEL_SETTINGS:
        raise ValueError(f"kernels: {setting!r}; valid: {', '.join(KERNEL_SETTINGS)}")
    if setting == "auto":
        return platform() in MEASURED_FASTER[kernel]
    return setting == "pallas"
