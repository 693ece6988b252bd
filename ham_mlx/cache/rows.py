"""What every cache knows about its rows: tokens seen per row and the padding of the next calls.

A cache holds B independent sequences (rows). `prepare` announces padding the way mlx-lm's batch
generator does (`lengths` = real tokens per row, right-padded after them; `left_padding` only on
an empty row); each layer then asks `call_rows(B, L)` for the real tokens of its call and
`advance`s afterwards. Padded positions never count as seen (spec §7).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import mlx.core as mx
import numpy as np

MAX_TOKENS = (1 << 31) - 1  # positions are int32


class CallRows(NamedTuple):
    """The real tokens of one call of L tokens: row b's are positions [start[b], stop[b])."""

    start: np.ndarray  # [B] int64, left padding
    stop: np.ndarray  # [B] int64
    offsets: np.ndarray  # [B] int64, tokens the row had seen before the call
    valid: mx.array | None  # [B, L] bool, None when every position is real

    @property
    def counts(self) -> np.ndarray:
        return self.stop - self.start

    def positions(self, L: int) -> mx.array:
        """Each token's position in its row [B, L] int32 (pads get their neighbour's)."""
        base = mx.array((self.offsets - self.start).astype(np.int32))[:, None]
        return base + mx.arange(L, dtype=mx.int32)[None]

    def query_positions(self, L: int) -> mx.array:
        """`positions`, as one row [L] when every row has the same."""
        base = self.offsets - self.start
        if (base == base[0]).all():
            return mx.arange(int(base[0]), int(base[0]) + L, dtype=mx.int32)
        return self.positions(L)


class RowState:
    """Per-row token counts and pending padding (a mixin of every cache class)."""

    offsets: np.ndarray | None  # [B] int64, None until the batch size is known
    _lengths: np.ndarray | None  # [B] real tokens left to come in the prepared span
    _left: np.ndarray | None  # [B] left padding of the next call

    def _init_rows(self) -> None:
        self.offsets = None
        self._lengths = None
        self._left = None

    @property
    def offset(self) -> int:
        """Tokens seen (the longest row's count when rows differ)."""
        return 0 if self.offsets is None or len(self.offsets) == 0 else int(self.offsets.max())

    @property
    def batch_size(self) -> int:
        return 1 if self.offsets is None else len(self.offsets)

    def size(self) -> int:
        return self.offset

    def _ensure_offsets(self, B: int) -> None:
        if self.offsets is None:
            self.offsets = np.zeros(B, dtype=np.int64)
        elif len(self.offsets) != B:
            raise ValueError(f"a batch of {B} rows for a cache of {len(self.offsets)} rows")

    # ---- mlx-lm's padding protocol ------------------------------------------------------------
    def prepare(
        self,
        *,
        lengths: Sequence[int] | None = None,
        right_padding: Sequence[int] | None = None,
        left_padding: Sequence[int] | None = None,
        **_: object,
    ) -> None:
        """Announce padding: row b has `lengths[b]` real tokens in the next call(s), padding
        after them (`right_padding` is implied by the lengths); `left_padding[b]` pads come
        before the row's tokens in the next call, which only an empty row may have."""
        if lengths is not None:
            self._lengths = _row_ints(lengths, "lengths")
        if left_padding is not None:
            left = _row_ints(left_padding, "left_padding")
            if left.any():
                if self.offsets is not None and (self.offsets[left > 0] > 0).any():
                    raise ValueError("left padding is only possible on an empty row")
                self._left = left

    def finalize(self) -> None:
        self._lengths = None
        self._left = None

    def make_mask(self, N: int, **_: object) -> mx.array | None:
        """[B, N] bool: which of the next call's N positions are real tokens (None: all)."""
        return self.call_rows(self.batch_size, N).valid

    def call_rows(self, B: int, L: int) -> CallRows:
        self._ensure_offsets(B)
        start = np.zeros(B, dtype=np.int64) if self._left is None else self._left
        stop = np.full(B, L, dtype=np.int64)
        if self._lengths is not None:
            stop = np.minimum(start + np.maximum(self._lengths, 0), L)
        for name, rows in (("left_padding", start), ("lengths", stop)):
            if len(rows) != B:
                raise ValueError(f"{name} has {len(rows)} rows, the batch {B}")
        valid = None
        if start.any() or (stop < L).any():
            pos = mx.arange(L)[None]
            valid = (pos >= mx.array(start)[:, None]) & (pos < mx.array(stop)[:, None])
        return CallRows(start, stop, self.offsets.copy(), valid)

    def advance(self, rows: CallRows, L: int) -> None:
        """After a call: count the real tokens, consume the prepared span and left padding."""
        if (self.offsets + rows.counts > MAX_TOKENS).any():
            raise ValueError(f"a row would exceed {MAX_TOKENS} tokens")
        self.offsets = self.offsets + rows.counts
        if self._lengths is not None:
            self._lengths = self._lengths - (rows.counts + 0)
        self._left = None

    # ---- rows ---------------------------------------------------------------------------------
    def _rows_like(self, rows: Sequence[int]) -> np.ndarray | None:
        return None if self.offsets is None else self.offsets[list(rows)].copy()


def _row_ints(values: Sequence[int], name: str) -> np.ndarray:
    a = np.asarray(values.tolist() if isinstance(values, mx.array) else values)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer) or (a < 0).any():
        raise ValueError(f"{name} must be a list of non-negative integers, one per row")
    return a.astype(np.int64)


def concat_offsets(parts: Sequence[RowState]) -> np.ndarray:
    return np.concatenate([
        np.zeros(p.batch_size, dtype=np.int64) if p.offsets is None else p.offsets for p in parts
    ])  # fmt: skip
