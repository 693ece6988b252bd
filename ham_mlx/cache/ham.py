"""The cache of a HAM layer: the GDN branch's conv inputs and state, plus a compact per-row
buffer of the admitted (k̂, v) pairs with each entry's position and surprise score (spec §7).

Its `Admission` decides τ and the capacity. Host bookkeeping (`settle`: counts, kv_budget's
observations, eviction down to max_kv_tokens) runs at the start of the next call, when the
previous step's results are already computed, so a decode step needs one host sync, not several.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from ham_mlx.admission import Admission
from ham_mlx.cache import checks
from ham_mlx.cache.kv_buffer import Entries, KVBuffer
from ham_mlx.cache.recurrent import RecurrentState, _as_list
from ham_mlx.cache.rows import CallRows


class HAMCache(RecurrentState):
    """ham layers. state = [conv, ssm, keys, values, positions, scores, count, offsets,
    controls (JSON)]."""

    def __init__(
        self,
        threshold: float | None = None,
        kv_budget: float | None = None,
        max_kv_tokens: int | None = None,
        kv_policy: str = "evict",
        step: int = 256,
    ) -> None:
        super().__init__()
        self.admission = Admission(threshold, kv_budget, max_kv_tokens, kv_policy)
        self.buffer = KVBuffer(step)

    # the controls, as attributes (read-only views of the admission policy)
    threshold = property(lambda self: self.admission.threshold)
    kv_budget = property(lambda self: self.admission.kv_budget)
    max_kv_tokens = property(lambda self: self.admission.max_kv_tokens)
    kv_policy = property(lambda self: self.admission.kv_policy)

    # ---- host bookkeeping ---------------------------------------------------------------------
    def settle(self) -> None:
        """Sync the counts, feed kv_budget, and evict down to max_kv_tokens. A no-op when nothing
        was stored since the last call."""
        if self.buffer.count is None or not self.buffer.changed:
            return
        counts = self.buffer.settle()
        self.admission.settle_pending()
        cap = self.admission.evict_cap
        if cap is not None and counts.max() > cap:
            self._evict(counts, cap)

    def _evict(self, counts: np.ndarray, cap: int) -> None:
        """Keep each row's `cap` highest-scoring entries (older first on ties), in slot order."""
        scores = np.array(self.buffer.entries.scores)
        keep = np.zeros((len(counts), cap), dtype=np.int64)
        for b, n in enumerate(counts):
            if n <= cap:
                keep[b, :n] = np.arange(n)
                keep[b, n:] = n  # beyond the count: ignored
            else:
                keep[b] = np.sort(np.argsort(-scores[b, :n], kind="stable")[:cap])
        self.buffer.keep(keep, np.minimum(counts, cap))

    def begin(self, B: int, L: int) -> CallRows:
        """Start a call of L tokens for B rows: settle the last one, size the rows."""
        self.settle()
        rows = self.call_rows(B, L)
        self.admission.ensure_rows(B)
        return rows

    def store(self, k, v, score, admitted, rows: CallRows, host: bool = False) -> None:
        """Append the admitted tokens: k [B, H, L, Dk], v [B, HV, L, Dv], score/admitted [B, L].
        host: read `admitted` on the host (a sync) and write the admitted tokens only."""
        L = admitted.shape[1]
        if host:
            self.buffer.write_known(k, v, rows.positions(L), score, np.array(admitted))
        else:
            self.buffer.write(k, v, rows.positions(L), score, admitted)
        self.admission.observe(score, admitted, rows.valid)
        self.advance(rows, L)

    # ---- reading ------------------------------------------------------------------------------
    def admitted_counts(self) -> list[int]:
        self.settle()
        counts = self.buffer.host_counts
        return [] if counts is None else [int(c) for c in counts]

    def fetch(self, exact: bool = False) -> tuple[mx.array, ...]:
        """keys [B,H,n,Dk], values [B,HV,n,Dv], scores [B,n], positions [B,n], count [B], where
        n bounds every row's count (exact: n = the largest count, at least 1, read on the
        host)."""
        e = self.buffer.view(max(self.buffer.filled(), 1) if exact else None)
        return e.keys, e.values, e.scores, e.positions, self.buffer.count

    @property
    def keys(self) -> mx.array | None:
        return None if self.buffer.entries is None else self.buffer.entries.keys

    @property
    def values(self) -> mx.array | None:
        return None if self.buffer.entries is None else self.buffer.entries.values

    @property
    def positions(self) -> mx.array | None:
        return None if self.buffer.entries is None else self.buffer.entries.positions

    @property
    def scores(self) -> mx.array | None:
        return None if self.buffer.entries is None else self.buffer.entries.scores

    @property
    def count(self) -> mx.array | None:
        return self.buffer.count

    @property
    def nbytes(self) -> int:
        self.settle()
        n = super().nbytes
        if self.buffer.entries is not None:
            n += sum(a.nbytes for a in self.buffer.view(self.buffer.n_max))
        return n

    # ---- files and other libraries ------------------------------------------------------------
    @property
    def state(self) -> list:
        self.settle()
        offsets = None if self.offsets is None else mx.array(self.offsets.astype(np.int32))
        controls = json.dumps(self.admission.to_json())
        if self.buffer.entries is None:
            return [self.conv, self.ssm, None, None, None, None, None, offsets, controls]
        e = self.buffer.view(self.buffer.n_max)
        return [self.conv, self.ssm, *e, self.buffer.count, offsets, controls]

    @state.setter
    def state(self, v: list) -> None:
        where = type(self).__name__
        conv, ssm, keys, values, positions, scores, count, offsets, controls = checks.state_list(
            v, 9, where
        )
        HAMCache.__init__(self)
        self.conv, self.ssm, self.offsets = self._check_recurrent(conv, ssm, offsets, where)
        rows = None if self.offsets is None else len(self.offsets)
        if not isinstance(controls, str) or len(controls) > 1 << 20:
            checks.fail(where, "controls", "must be a JSON string (at most 1 MiB)")
        try:
            parsed = json.loads(controls)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, or an int of > 4300 digits
            checks.fail(where, "controls", f"is not valid JSON ({e})")
        try:
            self.admission = Admission.from_json(parsed, rows, f"{where} controls")
        except ValueError as e:
            raise checks.CacheStateError(str(e)) from None
        if keys is None:
            for name, a in (("values", values), ("positions", positions), ("scores", scores),
                            ("count", count)):  # fmt: skip
                if a is not None:
                    checks.fail(where, name, "is set but the keys are missing")
            return
        if self.ssm is None:
            checks.fail(where, "ssm", "is missing while admitted entries are present")
        keys = checks.array(keys, where, "keys", 4)
        values = checks.array(values, where, "values", 4)
        B, H, n, Dk = keys.shape
        checks.same(where, "keys", B, rows, "rows")
        checks.same(where, "values", values.dtype, keys.dtype, "dtype (the keys')")
        checks.same(where, "values", (values.shape[0], values.shape[2]), (B, n), "(rows, slots)")
        checks.same(where, "keys", Dk, self.ssm.shape[3], "head size (ssm has Dk)")
        checks.same(where, "values", values.shape[1:2] + values.shape[3:],
                    self.ssm.shape[1:3], "(heads, head size) (ssm has HV, Dv)")  # fmt: skip
        if values.shape[1] % H:
            checks.fail(where, "keys", f"has {H} heads, not a divisor of {values.shape[1]}")
        positions = checks.array(positions, where, "positions", 2, checks.INTS)
        scores = checks.array(scores, where, "scores", 2, (mx.float32,))
        for name, a in (("positions", positions), ("scores", scores)):
            checks.same(where, name, tuple(a.shape), (B, n), "shape")
        counts = checks.ints(count, where, "count", B, 0, n)
        checks.increasing_positions(positions, counts, self.offsets, where)
        cap = self.admission.max_kv_tokens
        if cap is not None and counts.max(initial=0) > cap:
            checks.fail(where, "count", f"exceeds max_kv_tokens={cap}")
        self.buffer.load(Entries(keys, values, positions, scores), counts)

    @classmethod
    def from_state(cls, state: list) -> HAMCache:
        c = cls.__new__(cls)
        c.state = state
        return c

    def _select(self, rows: list[int]) -> HAMCache:
        self.settle()
        out = HAMCache.__new__(HAMCache)
        RecurrentState.__init__(out)
        self._select_recurrent(out, rows)
        out.admission = self.admission.select(rows)
        out.buffer = self.buffer.select(rows)
        return out

    def filter(self, batch_indices: Sequence[int]) -> None:
        out = self._select(_as_list(batch_indices))
        self.__dict__.update(out.__dict__)

    def extract(self, idx: int) -> HAMCache:
        return self._select([idx])

    def extend(self, other: HAMCache) -> None:
        self.__dict__.update(HAMCache.merge([self, other]).__dict__)

    @classmethod
    def merge(cls, caches: Sequence[HAMCache]) -> HAMCache:
        for c in caches:
            c.settle()
        sizes = [c.batch_size for c in caches]
        out = cls.__new__(cls)
        RecurrentState.__init__(out)
        out._concat_recurrent(caches)
        out.admission = Admission.concat([c.admission for c in caches], sizes)
        like = next((c.buffer.view() for c in caches if c.buffer.entries is not None), None)
        out.buffer = KVBuffer.concat([c.buffer for c in caches], sizes, like, caches[0].buffer.step)
        return out
