"""Safetensors files without the safetensors package: a lazy reader and a small writer.

The layout and the checks of the header: `ham_mlx.safetensors_header`.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from ham_mlx.convert.tensors import DTYPES, ConversionError, LazyTensor
from ham_mlx.safetensors_header import read_header


def read_safetensors(path: str | Path) -> dict[str, LazyTensor]:
    """Every tensor of a safetensors file, read lazily (memory-mapped on first use). The header
    is checked first (`ham_mlx.safetensors_header`): tensors that overlap, leave gaps or have
    shapes that are not non-negative integers are refused."""
    path = Path(path)
    entries, _ = read_header(path, ConversionError)
    tensors = {}
    for name, e in entries.items():
        t = LazyTensor(str(path), name, e.dtype, e.shape, read=lambda: None)  # type: ignore[arg-type]
        if e.dtype in DTYPES:
            t.read = _reader(path, DTYPES[e.dtype][0], e.begin, math.prod(e.shape))
        tensors[name] = t
    return tensors


def _reader(path: Path, dtype: np.dtype, offset: int, numel: int):
    def read() -> np.ndarray:
        if numel == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(numel,))

    return read


def write_safetensors(
    path: str | Path, tensors: dict[str, np.ndarray], dtypes: dict[str, str] | None = None,
    metadata: dict[str, str] | None = None,
) -> None:  # fmt: skip
    """Write numpy arrays as safetensors. `dtypes` overrides a tensor's dtype name (e.g. "BF16"
    for uint16 arrays that hold bfloat16 bits)."""
    names = {np.dtype(v[0]).str: k for k, v in DTYPES.items() if k not in ("BF16",)}
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    blobs = []
    for name, a in tensors.items():
        a = np.array(a, order="C", copy=None)  # (ascontiguousarray makes 0-d arrays 1-d)
        dtype = (dtypes or {}).get(name) or names.get(a.dtype.newbyteorder("<").str)
        if dtype is None:
            raise ValueError(f"{name}: numpy dtype {a.dtype} has no safetensors name")
        data = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(data)]}  # fmt: skip
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for data in blobs:
            f.write(data)
