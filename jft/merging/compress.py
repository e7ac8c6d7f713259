"""ComPEFT: sparse ternary compression of task vectors and PEFT updates (Yadav, Choshen,
Raffel & Bansal 2023, "ComPEFT: Compression for Communicating Parameter Efficient Updates
via Sparsification and Quantization"; repo prateeky2806/ComPEFT).

Per tensor τ (a task vector's leaf, or a LoRA factor: the reference compresses LoRA's A
and B themselves), with n = τ.size:

1. keep the k = int(density · n) entries of largest |τ| (jft's `magnitude_mask`
   convention: truncated count, equal magnitudes taken in flat-index order; exact
   zeros are never kept, their sign being 0);
2. replace each kept entry by sign(τ) · scale, scale = scale_multiplier · std(τ), the
   standard deviation of the whole original tensor with Bessel's correction (torch's
   `tv.std()`, as the reference computes it), stored as float32.

Defaults follow the reference's CLI (`bert_eval.py` / `t5_eval.py`: `--k 20`,
`--replace_factor 1.0`): density 0.2, scale_multiplier 1.0. The paper tunes both on
validation data. The reference flattens the *whole* update into one vector (one top-k,
one std); `scope="global"` in `compress_tensors` / `save_compressed` does that, the
default `"tensor"` treats each tensor on its own.

Storage: the kept positions as a bitmask (np.packbits, n bits) or, when sparser, as
uint32 flat indices (32 bits each), whichever is smaller, plus one sign bit per kept
entry (1 = negative), plus the float32 scale: at most 2 bits per entry. Files are
safetensors (no pickle): `<name>.positions`, `<name>.signs` (uint8, or uint32 indices),
`<name>.scale` (float32 [1]), shapes and encodings in the metadata.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from jft.errors import JftError
from jft.storage import save_safetensors

DEFAULT_DENSITY = 0.2
DEFAULT_SCALE_MULTIPLIER = 1.0
SCOPES = ("tensor", "global")
FORMAT = "jft-compeft"
COMPRESSED_FILE = "compressed.safetensors"  # in a `python -m jft.merge --method compress` output


@dataclasses.dataclass(frozen=True)
class CompressedTensor:
    """One tensor, ComPEFT-compressed.

    positions: `bitmask` encoding: uint8 [ceil(n/8)], np.packbits of the keep mask over
    the flattened tensor; `indices` encoding: uint32 [count], the kept flat indices,
    ascending. signs: uint8 [ceil(count/8)], packed, one bit per kept entry in flat
    order, 1 = negative.
    """

    shape: tuple[int, ...]
    dtype: str
    encoding: str  # "bitmask" or "indices"
    positions: np.ndarray
    signs: np.ndarray
    count: int
    scale: np.float32

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def kept(self) -> np.ndarray:
        """The kept flat indices, ascending, int64 [count]."""
        if self.encoding == "indices":
            return self.positions.astype(np.int64)
        return np.flatnonzero(np.unpackbits(self.positions, count=self.size))


def compress_tensor(x: Any, density: float = DEFAULT_DENSITY,
                    scale_multiplier: float = DEFAULT_SCALE_MULTIPLIER) -> CompressedTensor:
    """ComPEFT of one tensor: its top `density` by magnitude as sign × α·std(x)."""
    _check(density, scale_multiplier)
    flat = _flat(x)
    mask = _topk_mask(flat, int(density * flat.size))
    return _compress(x, flat, mask, np.float32(scale_multiplier * _std(flat)))


def compress_tensors(tensors: Mapping[str, Any], density: float = DEFAULT_DENSITY,
                     scale_multiplier: float = DEFAULT_SCALE_MULTIPLIER,
                     scope: str = "tensor") -> dict[str, CompressedTensor]:
    """ComPEFT of every tensor, each on its own (`scope="tensor"`) or, as the reference,
    with one top-k and one std over all of them flattened together, in the mapping's
    order (`"global"`)."""
    _check(density, scale_multiplier)
    if scope not in SCOPES:
        raise JftError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if scope == "tensor":
        return {name: compress_tensor(x, density, scale_multiplier)
                for name, x in tensors.items()}
    flats = {name: _flat(x) for name, x in tensors.items()}
    if not flats:
        return {}
    joined = np.concatenate(list(flats.values()))
    mask = _topk_mask(joined, int(density * joined.size))
    scale = np.float32(scale_multiplier * _std(joined))
    out, start = {}, 0
    for name, flat in flats.items():
        out[name] = _compress(tensors[name], flat, mask[start:start + flat.size], scale)
        start += flat.size
    return out


def decompress(compressed: CompressedTensor, dtype: Any = None) -> np.ndarray:
    """The dense tensor: ±scale at the kept positions, 0 elsewhere, in `dtype` (default:
    the original tensor's)."""
    values = np.zeros(compressed.size, np.float32)
    negative = np.unpackbits(compressed.signs, count=compressed.count).astype(bool)
    values[compressed.kept()] = np.where(negative, -compressed.scale, compressed.scale)
    return values.reshape(compressed.shape).astype(_np_dtype(dtype or compressed.dtype))


def compressed_bytes(compressed: CompressedTensor | Mapping[str, CompressedTensor]) -> int:
    """Payload bytes: positions, signs and the float32 scale (shapes and names aside)."""
    if isinstance(compressed, CompressedTensor):
        return compressed.positions.nbytes + compressed.signs.nbytes + 4
    return sum(compressed_bytes(c) for c in compressed.values())


def save_compressed(path: str | os.PathLike, tensors: Mapping[str, Any],
                    density: float = DEFAULT_DENSITY,
                    scale_multiplier: float = DEFAULT_SCALE_MULTIPLIER,
                    scope: str = "tensor") -> dict[str, CompressedTensor]:
    """Compresses `tensors` (name -> array; CompressedTensor values are stored as they
    are) and writes them to a safetensors file at `path`. Returns the compressed tensors."""
    raw = {k: v for k, v in tensors.items() if not isinstance(v, CompressedTensor)}
    compressed = {k: v for k, v in tensors.items() if isinstance(v, CompressedTensor)}
    compressed |= compress_tensors(raw, density, scale_multiplier, scope)
    arrays, headers = {}, {}
    for name in tensors:
        c = compressed[name]
        arrays[f"{name}.positions"] = c.positions
        arrays[f"{name}.signs"] = c.signs
        arrays[f"{name}.scale"] = np.asarray([c.scale], np.float32)
        headers[name] = _header(c)
    metadata = {"format": FORMAT, "version": "1", "tensors": json.dumps(headers)}
    save_safetensors(arrays, path, metadata=metadata)
    return {name: compressed[name] for name in tensors}


def load_compressed(path: str | os.PathLike, decompressed: bool = True
                    ) -> dict[str, np.ndarray] | dict[str, CompressedTensor]:
    """The tensors of a `save_compressed` file: dense arrays (default), or the
    CompressedTensors with `decompressed=False`."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise JftError(f"{path}: no such ComPEFT file")
    with safe_open(os.fspath(path), "np") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise JftError(f"{path}: not a jft ComPEFT file (metadata format "
                           f"{metadata.get('format')!r}, expected {FORMAT!r})")
        out = {}
        for name, header in json.loads(metadata["tensors"]).items():
            header = dict(header, scale=float(f.get_tensor(f"{name}.scale")[0]))
            c = _from_header(header, f.get_tensor(f"{name}.positions"),
                             f.get_tensor(f"{name}.signs"))
            out[name] = decompress(c) if decompressed else c
    return out


def _check(density: float, scale_multiplier: float) -> None:
    if not 0.0 <= density <= 1.0:
        raise JftError(f"density must be in [0, 1] (the fraction kept), got {density!r}")
    if not math.isfinite(scale_multiplier):
        raise JftError(f"scale_multiplier must be finite, got {scale_multiplier!r}")


def _flat(x: Any) -> np.ndarray:
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating) and x.dtype.name != "bfloat16":
        raise JftError(f"tensor dtype {x.dtype} is not floating point; ComPEFT compresses "
                       "float task vectors")
    return x.reshape(-1).astype(np.float64 if x.dtype == np.float64 else np.float32)


def _std(flat: np.ndarray) -> float:
    """The sample std (ddof 1, torch's default) in float64; 0 for a single entry."""
    return float(np.std(flat, ddof=1, dtype=np.float64)) if flat.size > 1 else 0.0


def _topk_mask(flat: np.ndarray, k: int) -> np.ndarray:
    """The k largest |x| (equal magnitudes in flat-index order, as a stable argsort),
    exact zeros left out: bool [n]."""
    magnitude = np.abs(flat)
    mask = np.zeros(flat.size, bool)
    k = min(k, flat.size)
    if k <= 0:
        return mask
    t = np.partition(magnitude, flat.size - k)[flat.size - k]  # the k-th largest
    mask = magnitude > t
    ties = np.flatnonzero(magnitude == t)
    mask[ties[:k - np.count_nonzero(mask)]] = True
    return mask & (flat != 0)


def _compress(x: Any, flat: np.ndarray, mask: np.ndarray, scale: np.float32
              ) -> CompressedTensor:
    kept = np.flatnonzero(mask)
    signs = np.packbits(flat[kept] < 0)
    bitmask_bytes, index_bytes = (flat.size + 7) // 8, 4 * kept.size
    if index_bytes < bitmask_bytes and flat.size < 2**32:
        encoding, positions = "indices", kept.astype(np.uint32)
    else:
        encoding, positions = "bitmask", np.packbits(mask)
    return CompressedTensor(tuple(np.shape(x)), np.asarray(x).dtype.name, encoding,
                            positions, signs, int(kept.size), np.float32(scale))


def _header(c: CompressedTensor) -> dict[str, Any]:
    return {"shape": list(c.shape), "dtype": c.dtype, "encoding": c.encoding,
            "count": c.count, "scale": float(c.scale)}


def _from_header(header: Mapping[str, Any], positions: np.ndarray,
                 signs: np.ndarray) -> CompressedTensor:
    return CompressedTensor(tuple(header["shape"]), header["dtype"], header["encoding"],
                            positions, signs, int(header["count"]),
                            np.float32(header["scale"]))


def _np_dtype(name: Any) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)
