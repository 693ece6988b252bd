"""Checks for cache state read from a file (or handed over by another library): every array's
type, dtype, shape and value range, before anything uses it. One clear ValueError per problem."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from ham_mlx.cache.rows import MAX_TOKENS

FLOATS = (mx.float32, mx.float16, mx.bfloat16)
INTS = (mx.int32, mx.int64, mx.int16, mx.int8, mx.uint8, mx.uint16, mx.uint32)


class CacheStateError(ValueError):
    """A cache state that cannot be used: names the class, the field and the problem."""


def fail(where: str, field: str, why: str) -> None:
    raise CacheStateError(f"{where}: field {field!r} {why}")


def state_list(state: Any, n: int, where: str) -> list:
    if not isinstance(state, (list, tuple)) or len(state) != n:
        got = len(state) if isinstance(state, (list, tuple)) else type(state).__name__
        raise CacheStateError(f"{where}: expected a state of {n} fields, got {got}")
    return list(state)


def array(value: Any, where: str, field: str, ndim: int, dtypes=FLOATS, optional=False):
    """value as an mx.array of ndim dims and one of dtypes, all finite for floats (or None)."""
    if value is None:
        if optional:
            return None
        fail(where, field, "is missing")
    if not isinstance(value, mx.array):
        fail(where, field, f"must be an array, got {type(value).__name__}")
    if value.ndim != ndim:
        fail(where, field, f"must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        fail(where, field, f"has dtype {value.dtype}, expected one of {[str(d) for d in dtypes]}")
    if value.dtype in FLOATS and value.size and not bool(mx.all(mx.isfinite(value))):
        fail(where, field, "holds NaN or infinite values")
    return value


def ints(value: Any, where: str, field: str, rows: int | None, lo: int = 0, hi: int = MAX_TOKENS):
    """value as a host int64 vector [rows] with entries in [lo, hi]."""
    a = array(value, where, field, 1, INTS)
    if rows is not None and a.shape[0] != rows:
        fail(where, field, f"has {a.shape[0]} rows, expected {rows}")
    h = np.array(a).astype(np.int64)
    if h.size and (h.min() < lo or h.max() > hi):
        fail(where, field, f"has values outside [{lo}, {hi}]")
    return h


def same(where: str, field: str, got: Any, want: Any, what: str) -> None:
    if got != want:
        fail(where, field, f"has {what} {got}, expected {want}")


def increasing_positions(positions: mx.array, counts: np.ndarray, offsets: np.ndarray, where: str):
    """Each row's stored positions [B, n] (its first counts[b]) increase within [0, offsets[b])."""
    pos = np.array(positions).astype(np.int64)
    for b, (n, offset) in enumerate(zip(counts, offsets)):
        p = pos[b, :n]
        if p.size and (p.min() < 0 or p.max() >= offset or (np.diff(p) <= 0).any()):
            fail(where, "positions", f"of row {b} are not increasing within [0, offset)")
