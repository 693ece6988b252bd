"""A compact per-row store of (key, value, position[, score]) entries (spec §7).

Row b's entries fill slots [0, count[b]) in the order they were stored; slots at or past the
count are unused. The buffer grows in steps and keeps one scratch slot at its end: tokens that
are not stored are written there, so one scatter stores the chosen tokens of every row without a
host synchronisation. `append_slots` and `scatter_entries` are pure functions, shared by the
general path and the compiled one-token decode step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import mlx.core as mx
import numpy as np


class Entries(NamedTuple):
    keys: mx.array  # [B, Hk, n, Dk]
    values: mx.array  # [B, Hv, n, Dv]
    positions: mx.array  # [B, n] int32
    scores: mx.array  # [B, n] float32 (zeros when the buffer keeps no scores)


def append_slots(count: mx.array, stored: mx.array, scratch: mx.array | int) -> mx.array:
    """slot [B, L] int32 of each token: count[b] + (stored tokens before it) when stored [B, L],
    else the scratch slot."""
    before = mx.cumsum(stored.astype(mx.int32), axis=1) - 1
    return mx.where(stored, count[:, None] + before, scratch)


def gather(x: mx.array, row: int, index: np.ndarray) -> mx.array:
    """x[row]'s entries at index along its token axis (x [B, L] or [B, H, L, D]): gathered by
    numpy where numpy holds x's dtype, from a view of x (MLX's CPU gather took 2-4 ms for 100
    tokens of a transposed [6, 1024, 128] array; numpy takes 0.04 ms)."""
    axis = 1 if x.ndim == 4 else 0
    if x.dtype in (mx.float32, mx.float16, mx.int32):
        return mx.array(np.take(np.asarray(x)[row], index, axis=axis))
    return mx.take(x[row], mx.array(index.astype(np.int32)), axis=axis)


def scatter_entries(
    e: Entries, slot: mx.array, k: mx.array, v: mx.array, positions: mx.array, scores: mx.array
) -> Entries:
    """Write tokens into their slots: k [B, Hk, L, Dk], v [B, Hv, L, Dv], positions and scores
    [B, L], slot [B, L]."""
    return Entries(
        mx.put_along_axis(e.keys, slot[:, None, :, None], k.astype(e.keys.dtype), axis=2),
        mx.put_along_axis(e.values, slot[:, None, :, None], v.astype(e.values.dtype), axis=2),
        mx.put_along_axis(e.positions, slot, positions.astype(mx.int32), axis=1),
        mx.put_along_axis(e.scores, slot, scores.astype(mx.float32), axis=1),
    )


class KVBuffer:
    def __init__(self, step: int = 256) -> None:
        self.step = step
        self.entries: Entries | None = None  # length alloc (the last slot is scratch)
        self.count: mx.array | None = None  # [B] int32
        self.n_max = 0  # max(count) as of the last settle (host)
        self._appended = 0  # tokens written since the last settle (bounds the new counts)
        self.host_counts: np.ndarray | None = None  # [B] as of the last settle
        self._known: np.ndarray | None = None  # [B] the counts now, when a write knew them

    # ---- sizes --------------------------------------------------------------------------------
    @property
    def bound(self) -> int:
        """An upper bound of every row's count, known on the host without a sync."""
        return self.n_max + self._appended

    @property
    def alloc(self) -> int:
        return 0 if self.entries is None else self.entries.keys.shape[2]

    def settle(self, known: np.ndarray | None = None) -> np.ndarray | None:
        """Host counts [B] (a sync unless `known` gives them, or nothing changed)."""
        if self.count is None:
            return None
        if self._appended or self.host_counts is None:
            known = self._known if known is None else known
            counts = known if known is not None else np.array(self.count).astype(np.int64)
            self.host_counts = counts
            self.n_max = int(counts.max()) if len(counts) else 0
            self._appended, self._known = 0, None
        return self.host_counts

    def reserve(self, k: mx.array, v: mx.array, L: int) -> int:
        """Room for L more entries of k [B, Hk, ., Dk], v [B, Hv, ., Dv] plus the scratch slot;
        returns the buffer length."""
        B = k.shape[0]
        if self.count is None:
            self.count = mx.zeros((B,), dtype=mx.int32)
            self.host_counts = np.zeros(B, dtype=np.int64)
        need = self.bound + L + 1
        if need > self.alloc:
            new = self.step * ((need + self.step - 1) // self.step)
            self.entries = self._grown(B, k.shape[1], k.shape[3], v.shape[1], v.shape[3],
                                       k.dtype, new)  # fmt: skip
        return self.alloc

    def _grown(self, B, Hk, Dk, Hv, Dv, dtype, new) -> Entries:
        e = Entries(
            mx.zeros((B, Hk, new, Dk), dtype=dtype), mx.zeros((B, Hv, new, Dv), dtype=dtype),
            mx.zeros((B, new), dtype=mx.int32), mx.zeros((B, new), dtype=mx.float32),
        )  # fmt: skip
        n = self.bound
        if n and self.entries is not None:
            e.keys[:, :, :n] = self.entries.keys[:, :, :n]
            e.values[:, :, :n] = self.entries.values[:, :, :n]
            e.positions[:, :n] = self.entries.positions[:, :n]
            e.scores[:, :n] = self.entries.scores[:, :n]
        return e

    # ---- writing ------------------------------------------------------------------------------
    def write(
        self, k: mx.array, v: mx.array, positions: mx.array, scores: mx.array, stored: mx.array
    ) -> None:
        """Store the tokens with stored [B, L] True: k [B, Hk, L, Dk], v [B, Hv, L, Dv],
        positions/scores [B, L]."""
        L = stored.shape[1]
        alloc = self.reserve(k, v, L)
        slot = append_slots(self.count, stored, alloc - 1)
        self.commit(scatter_entries(self.entries, slot, k, v, positions, scores),
                    self.count + stored.astype(mx.int32).sum(axis=1), L)  # fmt: skip

    def write_known(
        self, k: mx.array, v: mx.array, positions: mx.array, scores: mx.array, stored: np.ndarray
    ) -> None:
        """`write` with stored [B, L] known on the host (prefill on the CPU): only the stored
        tokens are gathered and written, each row's after its count (a slice update per row, no
        scatter of every token); the new counts are known on the host, so settling needs no
        sync."""
        counts = self.settle()
        if counts is None:
            counts = np.zeros(stored.shape[0], dtype=np.int64)
        new = stored.sum(axis=1)
        self.reserve(k, v, int(new.max()))
        e = self.entries
        for b in np.flatnonzero(new):
            idx = np.flatnonzero(stored[b])
            c, n = int(counts[b]), int(new[b])
            e.keys[b, :, c : c + n] = gather(k, b, idx).astype(e.keys.dtype)
            e.values[b, :, c : c + n] = gather(v, b, idx).astype(e.values.dtype)
            e.positions[b, c : c + n] = gather(positions, b, idx).astype(mx.int32)
            e.scores[b, c : c + n] = gather(scores, b, idx).astype(mx.float32)
        self.commit(e, mx.array((counts + new).astype(np.int32)), stored.shape[1])
        self._known = counts + new

    def write_at(self, k: mx.array, v: mx.array, start: int, counts: np.ndarray) -> None:
        """Every row stores all L tokens at slots [start, start + L) (rows aligned, no padding):
        a slice update instead of a scatter. counts [B]: the counts afterwards."""
        L = k.shape[2]
        self.reserve(k, v, L)
        e = self.entries
        e.keys[:, :, start : start + L] = k.astype(e.keys.dtype)
        e.values[:, :, start : start + L] = v.astype(e.values.dtype)
        e.positions[:, start : start + L] = mx.arange(start, start + L, dtype=mx.int32)[None]
        self.commit(e, mx.array(counts.astype(np.int32)), L)

    def set_counts(self, counts: np.ndarray) -> None:
        """Host-known counts [B] (no sync), e.g. after dropping the last entries of every row."""
        self.count = mx.array(counts.astype(np.int32))
        self.host_counts = counts.astype(np.int64)
        self.n_max = int(counts.max()) if len(counts) else 0
        self._appended, self._known = 0, None

    def settled_min(self) -> int:
        """Slots that every row had filled as of the last settle (host, no sync)."""
        counts = self.host_counts
        return int(counts.min()) if counts is not None and len(counts) else 0

    def filled(self) -> int:
        """max(count) now: one host sync. Leaves the bookkeeping to `settle`."""
        return 0 if self.count is None else int(mx.max(self.count).item())

    @property
    def changed(self) -> bool:
        """Whether entries were written since the last settle."""
        return self._appended > 0

    def commit(self, entries: Entries, count: mx.array, L: int) -> None:
        """Take the buffers after L tokens were written (by `write` or the decode step)."""
        self.entries, self.count = entries, count
        self._appended += L
        self._known = None

    def view(self, n: int | None = None) -> Entries:
        """The first n slots (default: the bound) of every row."""
        n = self.bound if n is None else n
        e = self.entries
        return Entries(e.keys[:, :, :n], e.values[:, :, :n], e.positions[:, :n], e.scores[:, :n])

    def keep(self, index: np.ndarray, counts: np.ndarray) -> None:
        """Keep, per row, the entries at index [B, m] (slot order), the first counts[b] valid."""
        idx = mx.array(index.astype(np.int32))
        e = self.entries
        m = index.shape[1]
        head = idx[:, None, :, None]
        e.keys[:, :, :m] = mx.take_along_axis(e.keys, head, axis=2)
        e.values[:, :, :m] = mx.take_along_axis(e.values, head, axis=2)
        e.positions[:, :m] = mx.take_along_axis(e.positions, idx, axis=1)
        e.scores[:, :m] = mx.take_along_axis(e.scores, idx, axis=1)
        self.set_counts(counts)

    # ---- rows ---------------------------------------------------------------------------------
    def select(self, rows: Sequence[int]) -> KVBuffer:
        out = KVBuffer(self.step)
        if self.count is None:
            return out
        counts = self.settle()[list(rows)]
        n = int(counts.max()) if len(counts) else 0
        idx = mx.array(list(rows))
        e = self.view(n)
        out.load(Entries(*(a[idx] for a in e)), counts)
        return out

    def load(self, e: Entries, counts: np.ndarray) -> None:
        """Take entries [B, ., n, .] (n >= every count) into a fresh buffer with room to grow."""
        B, Hk, n, Dk = e.keys.shape
        self.count = mx.array(counts.astype(np.int32))
        self.host_counts = counts.astype(np.int64)
        self.n_max, self._appended = 0, 0
        alloc = self.step * ((n + 1 + self.step - 1) // self.step)
        self.entries = Entries(
            mx.zeros((B, Hk, alloc, Dk), e.keys.dtype),
            mx.zeros((B, e.values.shape[1], alloc, e.values.shape[3]), e.values.dtype),
            mx.zeros((B, alloc), mx.int32), mx.zeros((B, alloc), mx.float32),
        )  # fmt: skip
        if n:
            self.entries.keys[:, :, :n] = e.keys
            self.entries.values[:, :, :n] = e.values
            self.entries.positions[:, :n] = e.positions.astype(mx.int32)
            self.entries.scores[:, :n] = e.scores.astype(mx.float32)
        self.n_max = int(counts.max()) if len(counts) else 0

    @classmethod
    def concat(cls, parts: Sequence[KVBuffer], sizes: Sequence[int], like: Entries | None,
               step: int) -> KVBuffer:  # fmt: skip
        """Rows of several buffers (an empty part contributes `sizes[i]` empty rows shaped like
        `like`, the view of any non-empty part)."""
        out = cls(step)
        if like is None:
            return out
        counts = [p.settle() if p.count is not None else np.zeros(s, np.int64)
                  for p, s in zip(parts, sizes)]  # fmt: skip
        n = max(int(c.max()) if len(c) else 0 for c in counts)
        pieces = []
        for p, s in zip(parts, sizes):
            if p.count is None:
                pieces.append(Entries(
                    mx.zeros((s, like.keys.shape[1], n, like.keys.shape[3]), like.keys.dtype),
                    mx.zeros((s, like.values.shape[1], n, like.values.shape[3]),
                             like.values.dtype),
                    mx.zeros((s, n), mx.int32), mx.zeros((s, n), mx.float32),
                ))  # fmt: skip
            else:
                pieces.append(Entries(*(_pad_to(a, n) for a in p.view(min(n, p.alloc)))))
        out.load(Entries(*(mx.concatenate(a) for a in zip(*pieces))), np.concatenate(counts))
        return out


def _pad_to(a: mx.array, n: int) -> mx.array:
    """a [B, ..., m, ...] with the slot axis (2 for 4-D, 1 for 2-D) zero-padded/cut to n."""
    axis = 2 if a.ndim == 4 else 1
    m = a.shape[axis]
    if m >= n:
        return a[:, :, :n] if axis == 2 else a[:, :n]
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, n - m)
    return mx.pad(a, pad)
