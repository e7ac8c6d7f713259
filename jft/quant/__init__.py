"""Quantized frozen bases (`quantize:`; docs/quantization.md): block-wise formats
(`formats.py`), the `QuantizedTensor` that holds one (`tensor.py`), and which of a
model's params are quantized and how they are laid out (`params.py`)."""

from jft.quant.formats import BLOCK_SIZES, FORMATS, QUANTIZE_CHOICES
from jft.quant.tensor import QuantizedTensor, dequantize, is_quantized, quantize

__all__ = ["BLOCK_SIZES", "FORMATS", "QUANTIZE_CHOICES", "QuantizedTensor", "dequantize",
           "is_quantized", "quantize"]
