"""Safetensors files without the safetensors package: a lazy reader and a small writer.

Layout: an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`), then the data;
offsets are relative to the end of the header.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ham_mlx.convert.tensors import DTYPES, ConversionError, LazyTensor

MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_safetensors(path: str | Path) -> dict[str, LazyTensor]:
    """Every tensor of a safetensors file, read lazily (memory-mapped on first use)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ConversionError(
                f"{path}: not a safetensors file, or truncated (header of {n} bytes in a file "
                f"of {size})"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ConversionError(f"{path}: not a safetensors file (bad header: {e!r})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: not a safetensors file (header is not an object)")
    start = 8 + n
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = str(info["dtype"]), tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path}: bad header entry for tensor {name!r}") from None
        t = LazyTensor(str(path), name, dtype, shape, read=lambda: None)  # type: ignore[arg-type]
        if dtype in DTYPES:
            numel = int(np.prod(shape, dtype=np.int64))
            if end - begin != numel * DTYPES[dtype][0].itemsize or begin < 0:
                raise ConversionError(f"{t.where}: {end - begin} bytes for shape {shape} {dtype}")
            if start + end > size:
                raise ConversionError(
                    f"{t.where}: data ends at byte {start + end} but the file has {size} bytes "
                    "(truncated?)"
                )
            t.read = _reader(path, DTYPES[dtype][0], start + begin, numel)
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
