"""The header of a safetensors file, checked before any tensor is read.

Layout: an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`), then the
data; offsets are relative to the end of the header. As the format requires, the tensors' byte
ranges tile the data exactly: sorted by offset they start at 0, each begins where the previous one
ends, the last ends at the end of the file, and each holds `prod(shape) * itemsize` bytes.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_HEADER_BYTES = 100 * 1024 * 1024
# Bytes per element of the safetensors dtypes (dtypes not listed here are refused by the readers,
# by name, when the tensor is loaded; their ranges are still checked against the others').
ITEMSIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offset in the file
    end: int


def read_header(path: Path, error: type[Exception]) -> tuple[dict[str, TensorEntry], dict]:
    """The tensors (name -> entry, offsets from the start of the file) and the metadata of a
    safetensors file; anything malformed raises `error` naming the file and the tensor."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if n is None or n > MAX_HEADER_BYTES or 8 + n > size:
                raise error(
                    f"{path}: not a safetensors file, or truncated (header of {n} bytes in a "
                    f"file of {size})"
                )
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise error(f"{path}: not a safetensors file (bad header: {e!r})") from None
    if not isinstance(header, dict):
        raise error(f"{path}: not a safetensors file (header is not an object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise error(f"{path}: __metadata__ must map strings to strings")
    start = 8 + n
    entries = {name: _entry(path, name, info, start, error) for name, info in header.items()}
    _check_tiling(path, entries, start, size, error)
    return entries, meta


def _entry(path: Path, name: str, info: Any, start: int, error: type[Exception]) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        raise error(f"{where}: bad header entry {json.dumps(info)[:200]} (dtype, shape, "
                    "data_offsets)")  # fmt: skip
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 2**31 for d in shape):
        raise error(f"{where}: shape {shape!r} must be a list of non-negative integers (< 2**31)")
    if (
        not isinstance(offsets, list) or len(offsets) != 2
        or not all(type(x) is int for x in offsets) or not 0 <= offsets[0] <= offsets[1]
    ):  # fmt: skip
        raise error(f"{where}: data_offsets {offsets!r} must be two integers 0 <= begin <= end")
    dtype = info["dtype"]
    begin, end = offsets
    if dtype in ITEMSIZES:
        nbytes = math.prod(shape) * ITEMSIZES[dtype]
        if nbytes != end - begin:
            raise error(f"{where}: {end - begin} bytes for shape {shape} {dtype} (needs {nbytes})")
    return TensorEntry(dtype, tuple(shape), start + begin, start + end)


def _check_tiling(path: Path, entries: dict[str, TensorEntry], start: int, size: int,
                  error: type[Exception]) -> None:  # fmt: skip
    at, prev = start, None
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin < at:
            raise error(f"{path}: tensors {prev!r} and {name!r} overlap")
        if e.begin > at:
            raise error(f"{path}: a gap of {e.begin - at} bytes before {name!r}")
        if e.end > size:
            raise error(f"{path}: tensor {name!r}: data ends at byte {e.end} but the file has "
                        f"{size} bytes (truncated?)")  # fmt: skip
        at, prev = e.end, name
    if at != size:
        raise error(f"{path}: {size - at} bytes after the last tensor")
