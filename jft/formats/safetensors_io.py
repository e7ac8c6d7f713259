"""Reading safetensors files one tensor at a time.

Written by hand on top of the documented format (8-byte little-endian header size,
a JSON header, then raw little-endian data) because the `safetensors` package's numpy
backend cannot return bfloat16, the usual dtype of LLM checkpoints, and because
reading each tensor with `readinto` keeps host memory at one tensor, where a memory
map leaves every page it touched resident. Pickle-based checkpoints are never read.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from jft.errors import JftError

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER = 100 * 1024 * 1024
_CHUNK_BYTES = 32 << 20


@dataclass(frozen=True)
class TensorInfo:
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """The header of one `.safetensors` file, validated, plus per-tensor reads."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tensors = _read_header(self.path)

    def names(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str, dtype=None, rows: tuple[int, int] | None = None,
             columns: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor, or rows [start, stop) of its first axis and columns [start, stop) of
        its last, cast to `dtype` (default: as stored) a chunk of rows at a time. Whole rows
        are read; columns outside `columns` are dropped chunk by chunk."""
        info = self.tensors[name]
        shape = info.shape or (1,)
        start, stop = rows or (0, shape[0])
        row_shape = shape[1:]
        if columns is not None:
            row_shape = (*row_shape[:-1], columns[1] - columns[0])
        row_items = int(np.prod(shape[1:]))
        out = np.empty((stop - start, *row_shape), dtype or info.dtype)
        step = max(1, _CHUNK_BYTES // max(row_items * info.dtype.itemsize, 1))
        with open(self.path, "rb") as file:
            file.seek(info.start + start * row_items * info.dtype.itemsize)
            for first in range(0, stop - start, step):
                chunk = np.empty((min(step, stop - start - first), *shape[1:]), info.dtype)
                # Through a uint8 view: numpy exports no buffer for ml_dtypes' bfloat16.
                if file.readinto(chunk.reshape(-1).view(np.uint8)) != chunk.nbytes:
                    raise JftError(f"{self.path}: tensor {name!r} is truncated")
                if columns is not None:
                    chunk = chunk[..., columns[0]:columns[1]]
                out[first:first + len(chunk)] = chunk
        return out if info.shape else out.reshape(())


def _read_header(path: Path) -> dict[str, TensorInfo]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            raw = file.read(8)
            if len(raw) < 8:
                raise JftError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (header_size,) = struct.unpack("<Q", raw)
            if header_size > min(_MAX_HEADER, size - 8):
                raise JftError(f"{path}: corrupt safetensors header (size {header_size} bytes)")
            header = json.loads(file.read(header_size))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise JftError(f"{path}: cannot read safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise JftError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_size
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise JftError(
                f"{path}: tensor {name!r} has an unsupported dtype or a corrupt header entry; "
                f"supported dtypes: {', '.join(_DTYPES)}"
            ) from None
        if end - begin != dtype.itemsize * int(np.prod(shape)) or end < begin:
            raise JftError(f"{path}: tensor {name!r} has inconsistent data offsets")
        if data_start + end > size:
            raise JftError(
                f"{path}: file is truncated (tensor {name!r} ends at byte {data_start + end}, "
                f"file has {size})"
            )
        tensors[name] = TensorInfo(dtype, shape, data_start + begin, data_start + end)
    return tensors
