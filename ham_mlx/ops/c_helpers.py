"""Loading the optional C helpers (`ham_mlx/_*_cpu.c`) and handing MLX arrays to them.

Each helper is a shared library that `pip install` compiles where a C compiler exists; one that
calls BLAS binds itself to the OpenBLAS that ham_mlx._blas loaded (its `init(path)` returns 0 on
success).
"""

from __future__ import annotations

import ctypes
import glob
import os

import mlx.core as mx
import numpy as np

from ham_mlx import _blas
from ham_mlx.lanes import cpu_count

# Calls shorter than this (decode steps on the general path) keep the lazy MLX forms: the host
# sync before a C call would cost more than the call saves.
MIN_TOKENS = 16

_loaded: dict[str, ctypes.CDLL | None] = {}


def load_helper(stem: str, init: str | None, entry: str) -> ctypes.CDLL | None:
    """The helper `ham_mlx/<stem>*.so`, bound to the loaded OpenBLAS by its `init` (None: a
    helper that calls no BLAS), its function `entry` returning an int status; None where it was
    not built or there is no OpenBLAS (the helpers serve the Linux CPU path, which loads it).
    Tried once per process."""
    if stem in _loaded:
        return _loaded[stem]
    _loaded[stem] = None
    if _blas.loaded_openblas is None:
        return None
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for path in sorted(glob.glob(os.path.join(here, f"{stem}*.so"))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if init is not None:
            getattr(lib, init).argtypes = [ctypes.c_char_p]
        if init is None or getattr(lib, init)(_blas.loaded_openblas.encode()) == 0:
            getattr(lib, entry).restype = ctypes.c_int
            _loaded[stem] = lib
            break
    return _loaded[stem]


def wanted(off_variable: str) -> bool:
    """Whether a helper may run now: on the CPU device, and not turned off by its variable."""
    return os.environ.get(off_variable, "") in ("", "0") and mx.default_device() == mx.cpu


def threads(variable: str) -> int:
    """Threads for one call: the environment variable, else the CPUs this process may use."""
    value = os.environ.get(variable, "")
    return max(1, int(value)) if value else cpu_count()


def host(x: mx.array, dtype: mx.Dtype) -> np.ndarray:
    """A numpy view of x (a copy only where the dtype or the innermost stride needs one)."""
    a = np.asarray(x if x.dtype == dtype else x.astype(dtype))
    if a.ndim and a.strides[-1] != a.itemsize:
        a = np.ascontiguousarray(a)
    return a


def pointer(a: np.ndarray, ctype) -> ctypes._Pointer:
    return a.ctypes.data_as(ctypes.POINTER(ctype))
