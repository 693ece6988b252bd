"""Tensors read lazily from checkpoint files: a shape, a dtype and a way to read the bytes.

Readers (`safetensors_io`, `torch_zip`) return `LazyTensor`s; nothing is read from disk until
`load()` is called, one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ham_mlx.model_io import CheckpointError


class ConversionError(CheckpointError):
    """A checkpoint that cannot be converted: the message names the file, key or value."""


# Safetensors dtype names -> (numpy dtype of the raw bytes, MLX dtype). BF16 is read as uint16.
DTYPES: dict[str, tuple[np.dtype, mx.Dtype]] = {
    "F64": (np.dtype("<f8"), mx.float32),  # MLX's CPU float64 is limited: read as float32
    "F32": (np.dtype("<f4"), mx.float32),
    "F16": (np.dtype("<f2"), mx.float16),
    "BF16": (np.dtype("<u2"), mx.bfloat16),
    "I64": (np.dtype("<i8"), mx.int64),
    "I32": (np.dtype("<i4"), mx.int32),
    "I16": (np.dtype("<i2"), mx.int16),
    "I8": (np.dtype("i1"), mx.int8),
    "U8": (np.dtype("u1"), mx.uint8),
    "BOOL": (np.dtype("?"), mx.bool_),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def check_dtype(dtype: str, where: str) -> None:
    if dtype not in DTYPES:
        raise ConversionError(
            f"{where} has dtype {dtype}, which ham-mlx cannot convert "
            f"(supported: {', '.join(DTYPES)})"
        )


@dataclass
class LazyTensor:
    """One tensor of a checkpoint file; `read()` returns its elements as a flat numpy array."""

    file: str
    name: str
    dtype: str  # a key of DTYPES, or the source's own name for one we cannot read
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]

    @property
    def where(self) -> str:
        return f"{self.file}: tensor {self.name!r}"

    @property
    def nbytes(self) -> int:
        item = DTYPES[self.dtype][0].itemsize if self.dtype in DTYPES else 0
        return int(np.prod(self.shape, dtype=np.int64)) * item

    def numpy(self) -> np.ndarray:
        """The tensor as a C-contiguous numpy array (BF16 as its raw uint16 bits)."""
        check_dtype(self.dtype, self.where)
        flat = self.read()
        return np.ascontiguousarray(flat).reshape(self.shape)

    def load(self) -> mx.array:
        """The tensor as an MLX array in its own dtype (F64 becomes float32)."""
        a = self.numpy()
        if self.dtype == "BF16":
            return mx.array(a).view(mx.bfloat16)
        if self.dtype == "F64":
            a = a.astype(np.float32)
        return mx.array(a)
