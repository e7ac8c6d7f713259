"""Reading GGUF files: metadata as plain Python values, tensors dequantized by row chunks.

The header is parsed here rather than with `gguf.GGUFReader`, which builds a numpy
view per array element: 10-20 s for Gemma's 262k-token vocabulary, against well under
a second for this parser. Dequantization is the `gguf` package's own
(`gguf.quants.dequantize`). Tensor bytes are read with `readinto` a chunk of rows at a
time, so host memory holds the output plus one chunk, never a memory map of the file.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from jft.errors import JftError

SUPPORTED_TYPES = tuple(
    GGMLQuantizationType[name]
    for name in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                 "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
)
_CHUNK_BYTES = 16 << 20

# GGUF value types -> struct formats (little-endian); 8 is string and 9 array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
          10: "<u8", 11: "<i8", 12: "<f8"}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy order: outermost first, so linear weights read [out, in]
    kind: GGMLQuantizationType
    start: int
    nbytes: int


class GGUFFile:
    """A GGUF file's metadata (`metadata`: key -> value) and tensor index (`tensors`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as file:
                self.metadata, self.tensors = _Parser(file).parse(self.path.stat().st_size)
        except (struct.error, UnicodeDecodeError, ValueError, OverflowError, MemoryError) as error:
            raise JftError(f"{self.path}: not a valid GGUF file ({error})") from None

    def read(self, name: str, dtype=np.float32, rows: tuple[int, int] | None = None,
             columns: tuple[int, int] | None = None):
        """The tensor, or rows [start, stop) of its first axis and columns [start, stop) of
        its innermost, dequantized to `dtype` a chunk of rows at a time. Quantization
        blocks run along the innermost axis, so whole rows are decoded and the columns
        outside `columns` dropped."""
        tensor = self.tensors[name]
        if tensor.kind not in SUPPORTED_TYPES:
            supported = ", ".join(t.name for t in SUPPORTED_TYPES)
            raise JftError(
                f"{self.path}: tensor {name!r} has quantization {tensor.kind.name}, "
                f"not supported; supported: {supported}"
            )
        block, block_bytes = GGML_QUANT_SIZES[tensor.kind]
        if len(tensor.shape) == 1 and rows is not None:  # one row: decode the blocks needed
            first_block, stop_block = rows[0] // block, -(-rows[1] // block)
            raw = np.empty((1, (stop_block - first_block) * block_bytes), np.uint8)
            with open(self.path, "rb") as file:
                file.seek(tensor.start + first_block * block_bytes)
                if file.readinto(memoryview(raw).cast("B")) != raw.nbytes:
                    raise JftError(f"{self.path}: tensor {name!r} is truncated")
            skip = first_block * block
            return dequantize(raw, tensor.kind)[0, rows[0] - skip:rows[1] - skip].astype(dtype)
        # Rows of the innermost dimension; the first axis spans `per_first` of them.
        row_bytes = tensor.shape[-1] // block * block_bytes
        per_first = int(np.prod(tensor.shape[1:-1])) if len(tensor.shape) > 1 else 1
        start, stop = rows or (0, tensor.shape[0] if len(tensor.shape) > 1 else 1)
        first_column, stop_column = columns or (0, tensor.shape[-1])
        count_rows = (stop - start) * per_first
        out = np.empty((count_rows, stop_column - first_column), dtype)
        # Size chunks by their decoded float32 rows: Q4 data grows 7x when decoded.
        step = max(1, _CHUNK_BYTES // (tensor.shape[-1] * 4))
        with open(self.path, "rb") as file:
            file.seek(tensor.start + start * per_first * row_bytes)
            for first in range(0, count_rows, step):
                raw = np.empty((min(step, count_rows - first), row_bytes), np.uint8)
                if file.readinto(memoryview(raw).cast("B")) != raw.nbytes:
                    raise JftError(f"{self.path}: tensor {name!r} is truncated")
                decoded = dequantize(raw, tensor.kind)
                out[first:first + len(raw)] = decoded[:, first_column:stop_column]
        if rows is None and columns is None:
            return out.reshape(tensor.shape)
        return out.reshape(stop - start, *tensor.shape[1:-1], stop_column - first_column)


    def read_raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored, [rows, bytes per row] (rows: every axis but the
        innermost): its quantization blocks, undecoded."""
        tensor = self.tensors[name]
        block, block_bytes = GGML_QUANT_SIZES[tensor.kind]
        raw = np.empty((tensor.nbytes // (tensor.shape[-1] // block * block_bytes),
                        tensor.shape[-1] // block * block_bytes), np.uint8)
        with open(self.path, "rb") as file:
            file.seek(tensor.start)
            if file.readinto(memoryview(raw).cast("B")) != raw.nbytes:
                raise JftError(f"{self.path}: tensor {name!r} is truncated")
        return raw


class _Parser:
    def __init__(self, file):
        self.file = file

    def parse(self, size: int):
        if self.file.read(4) != b"GGUF":
            raise ValueError("missing the GGUF magic bytes")
        (version,) = self._unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version}; supported: 2, 3")
        tensor_count, kv_count = self._unpack("<QQ")
        if tensor_count > size or kv_count > size:
            raise ValueError("corrupt header counts")
        metadata = {}
        for _ in range(kv_count):
            key = self._string()
            (kind,) = self._unpack("<I")
            metadata[key] = self._value(kind)
        infos = []
        for _ in range(tensor_count):
            name = self._string()
            (ndim,) = self._unpack("<I")
            if ndim > 8:
                raise ValueError(f"tensor {name!r} has {ndim} dimensions")
            dims = self._unpack(f"<{ndim}Q")
            kind, offset = self._unpack("<IQ")
            infos.append((name, tuple(reversed(dims)), kind, offset))
        alignment = int(metadata.get("general.alignment", 32))
        data_start = -(-self.file.tell() // alignment) * alignment
        tensors = {}
        for name, shape, kind, offset in infos:
            tensors[name] = _tensor(name, shape, kind, data_start + offset, size)
        return metadata, tensors

    def _unpack(self, fmt: str):
        width = struct.calcsize(fmt)
        raw = self.file.read(width)
        if len(raw) != width:
            raise ValueError("file ends inside its header")
        return struct.unpack(fmt, raw)

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        raw = self.file.read(length)
        if len(raw) != length:
            raise ValueError("file ends inside its header")
        return raw.decode("utf-8")

    def _value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self._unpack(_SCALARS[kind])[0]
        if kind == 8:
            return self._string()
        if kind != 9:
            raise ValueError(f"unknown metadata value type {kind}")
        element, count = self._unpack("<IQ")
        if element in _NUMPY:
            dtype = np.dtype(_NUMPY[element])
            raw = self.file.read(dtype.itemsize * count)
            if len(raw) != dtype.itemsize * count:
                raise ValueError("file ends inside its header")
            return np.frombuffer(raw, dtype).tolist()
        if element == 8:
            return [self._string() for _ in range(count)]
        return [self._value(element) for _ in range(count)]


def _tensor(name, shape, kind, start, size) -> GGUFTensor:
    try:
        kind = GGMLQuantizationType(kind)
    except ValueError:
        raise ValueError(f"tensor {name!r} has unknown type {kind}") from None
    block, block_bytes = GGML_QUANT_SIZES[kind]
    if not shape or shape[-1] % block:
        raise ValueError(f"tensor {name!r} rows of {shape[-1:]} do not fill {kind.name} blocks")
    nbytes = int(np.prod(shape)) // block * block_bytes
    if start + nbytes > size:
        raise ValueError(f"file is truncated (tensor {name!r} ends at byte {start + nbytes}, "
                         f"file has {size})")
    return GGUFTensor(name, shape, kind, start, nbytes)
