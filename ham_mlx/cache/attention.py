"""The cache of a softmax attention layer: a compact per-row buffer of keys (after RoPE) and
values with their positions; with a sliding window W only the last W-1 positions are kept."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from ham_mlx.cache import checks
from ham_mlx.cache.kv_buffer import Entries, KVBuffer
from ham_mlx.cache.recurrent import _as_list
from ham_mlx.cache.rows import CallRows, RowState, concat_offsets


class AttnCache(RowState):
    """attn layers. state = [keys, values, positions, count, offsets, window]."""

    def __init__(self, window: int | None = None, step: int = 256) -> None:
        if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                                   or window < 1):  # fmt: skip
            raise ValueError(f"window={window!r} must be a positive integer or None")
        self._init_rows()
        self.window = window
        self.buffer = KVBuffer(step)
        self.dropped = False  # entries fell out of the window (trimming cannot restore them)

    @property
    def counts(self) -> np.ndarray:
        c = self.buffer.host_counts
        return np.zeros(self.batch_size, np.int64) if c is None else c

    @property
    def keys(self) -> mx.array | None:
        return None if self.buffer.entries is None else self.buffer.view().keys

    @property
    def values(self) -> mx.array | None:
        return None if self.buffer.entries is None else self.buffer.view().values

    @property
    def fill(self) -> int:
        """Entries per row that attention can still read (the longest row's)."""
        return int(self.window_counts().max(initial=0))

    def window_counts(self) -> np.ndarray:
        """[B] entries per row within the window (stored ones may be more, until dropped)."""
        return self.counts if self.window is None else np.minimum(self.counts, self.window - 1)

    def empty(self) -> bool:
        return self.buffer.entries is None

    @property
    def nbytes(self) -> int:
        if self.buffer.entries is None:
            return 0
        e = self.buffer.view()
        return e.keys.nbytes + e.values.nbytes + e.positions.nbytes

    # ---- the layer's call ---------------------------------------------------------------------
    def aligned(self, rows: CallRows) -> bool:
        """Whether every row has seen the same tokens, all stored from position 0, and the call
        has no padding: then slot = position in every row (a plain causal mask works)."""
        o = rows.offsets
        return rows.valid is None and (o == o[0]).all() and (self.counts == o).all()

    def store(self, k: mx.array, v: mx.array, rows: CallRows) -> tuple[Entries, mx.array]:
        """Store the real tokens of k [B, N, L, hd], v [B, N, L, hdv] (after RoPE); returns the
        buffer's entries (the first n slots) and count [B] after the call."""
        B, _, L, _ = k.shape
        if self.window is not None and self.buffer.bound + L + 1 > self.buffer.alloc:
            self._drop_outside_window()
        counts = self.counts + rows.counts
        if self.aligned(rows):  # the same as the scatter below, as one slice update
            self.buffer.write_at(k, v, int(rows.offsets[0]), counts)
        else:
            stored = mx.ones((B, L), dtype=mx.bool_) if rows.valid is None else rows.valid
            scores = mx.zeros((B, L), dtype=mx.float32)
            self.buffer.write(k, v, rows.positions(L), scores, stored)
        self.buffer.settle(known=counts)
        return self.buffer.view(), self.buffer.count

    def _drop_outside_window(self) -> None:
        """Keep each row's last W-1 entries (positions before a coming query's window)."""
        counts = self.counts
        W1 = self.window - 1
        if self.buffer.entries is None or counts.max() <= W1:
            return
        kept = np.minimum(counts, W1)
        index = np.arange(max(W1, 1))[None, :] + (counts - kept)[:, None]
        self.buffer.keep(index, kept)
        self.dropped = True

    # ---- mlx-lm protocol ----------------------------------------------------------------------
    def is_trimmable(self) -> bool:
        return not self.dropped

    def trim(self, n: int) -> int:
        """Drop the last n tokens of every row (speculative decoding, prefix reuse)."""
        if self.dropped:
            raise ValueError("this sliding-window cache dropped entries: it cannot be trimmed")
        if self.offsets is None:
            return 0
        n = int(min(n, self.offsets.min()))
        if n > 0:
            self.offsets = self.offsets - n
            self.buffer.set_counts(self.counts - n)
        return n

    def to_quantized(self, group_size: int = 64, bits: int = 4):
        raise ValueError(
            "kv_bits: ham_mlx attention caches are not quantized (their keys are read by HAM's "
            "and the ONNX export's attention as float); run without kv_bits"
        )

    def window_entries(self) -> tuple[Entries, np.ndarray]:
        """Each row's entries within the window, without dropping the others from the buffer
        (so that the cache stays trimmable): entries [B, ., m, .] and counts [B]."""
        counts, kept = self.counts, self.window_counts()
        if (kept == counts).all():
            return self.buffer.view(self.buffer.n_max), counts
        m = int(kept.max())
        index = mx.array((np.arange(m)[None, :] + (counts - kept)[:, None]).astype(np.int32))
        e = self.buffer.entries
        head = index[:, None, :, None]
        return Entries(
            mx.take_along_axis(e.keys, head, axis=2), mx.take_along_axis(e.values, head, axis=2),
            mx.take_along_axis(e.positions, index, axis=1),
            mx.take_along_axis(e.scores, index, axis=1),
        ), kept  # fmt: skip

    @property
    def state(self) -> list:
        if self.buffer.entries is None:
            offsets = None if self.offsets is None else mx.array(self.offsets.astype(np.int32))
            return [None, None, None, None, offsets, self.window]
        e, counts = self.window_entries()
        return [
            e.keys, e.values, e.positions, mx.array(counts.astype(np.int32)),
            mx.array(self.offsets.astype(np.int32)), self.window,
        ]  # fmt: skip

    @state.setter
    def state(self, v: list) -> None:
        where = type(self).__name__
        keys, values, positions, count, offsets, window = checks.state_list(v, 6, where)
        if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                                   or not 1 <= window <= checks.MAX_TOKENS):  # fmt: skip
            checks.fail(where, "window", f"must be a positive integer or None, got {window!r}")
        self.__init__(window)
        if keys is None:
            for name, a in (("values", values), ("positions", positions), ("count", count)):
                if a is not None:
                    checks.fail(where, name, "is set but the keys are missing")
            if offsets is not None:
                self.offsets = checks.ints(offsets, where, "offsets", None)
                if self.offsets.any():
                    checks.fail(where, "offsets", "are non-zero for an empty cache")
            return
        keys = checks.array(keys, where, "keys", 4)
        values = checks.array(values, where, "values", 4)
        B, N, n, _ = keys.shape
        checks.same(where, "values", values.shape[:3], (B, N, n), "shape[:3]")
        checks.same(where, "values", values.dtype, keys.dtype, "dtype (the keys')")
        positions = checks.array(positions, where, "positions", 2, checks.INTS)
        checks.same(where, "positions", tuple(positions.shape), (B, n), "shape")
        counts = checks.ints(count, where, "count", B, 0, n)
        offsets = checks.ints(offsets, where, "offsets", B)
        checks.increasing_positions(positions, counts, offsets, where)
        if (counts > offsets).any():
            checks.fail(where, "count", "exceeds the tokens seen (offsets)")
        if window is None and (counts != offsets).any():
            checks.fail(where, "count", "differs from offsets in a cache without a window")
        self.offsets = offsets
        self.dropped = bool((counts < offsets).any())
        self.buffer.load(Entries(keys, values, positions, mx.zeros((B, n))), counts)

    @classmethod
    def from_state(cls, state: list) -> AttnCache:
        c = cls.__new__(cls)
        c.state = state
        return c

    def _select(self, rows: list[int]) -> AttnCache:
        out = AttnCache(self.window, self.buffer.step)
        out.offsets = self._rows_like(rows)
        out.buffer = self.buffer.select(rows)
        out.dropped = self.dropped
        return out

    def filter(self, batch_indices: Sequence[int]) -> None:
        out = self._select(_as_list(batch_indices))
        self.offsets, self.buffer = out.offsets, out.buffer

    def extract(self, idx: int) -> AttnCache:
        return self._select([idx])

    def extend(self, other: AttnCache) -> None:
        merged = AttnCache.merge([self, other])
        self.offsets, self.buffer, self.dropped = merged.offsets, merged.buffer, merged.dropped

    @classmethod
    def merge(cls, caches: Sequence[AttnCache]) -> AttnCache:
        windows = {c.window for c in caches}
        if len(windows) > 1:
            raise ValueError(f"cannot batch attention caches with different windows {windows}")
        out = cls(caches[0].window, caches[0].buffer.step)
        out.offsets = concat_offsets(caches)
        like = next((c.buffer.view() for c in caches if c.buffer.entries is not None), None)
        sizes = [c.batch_size for c in caches]
        out.buffer = KVBuffer.concat([c.buffer for c in caches], sizes, like, out.buffer.step)
        out.dropped = any(c.dropped for c in caches)
        return out
