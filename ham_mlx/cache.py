"""Per-layer inference caches (mlx-lm's cache protocol: `state`, `meta_state`, `offset`).

- `GDNCache`  (gdn layers): the last Kc-1 conv inputs and the recurrent state S.
- `AttnCache` (attn layers): keys (after RoPE) and values, the last W-1 with a sliding window.
- `HAMCache`  (ham layers): a GDNCache plus the admitted keys/values in a preallocated buffer that
  grows in steps, a per-row count, and per entry its position and surprise score (spec §7).
"""

from __future__ import annotations

import json
from typing import Any

import mlx.core as mx
import numpy as np

from ham_mlx.controls import BudgetController, calibrated_threshold

KV_POLICIES = ("evict", "reject")


class GDNCache:
    def __init__(self) -> None:
        self.conv: mx.array | None = None  # [B, Kc-1, C] raw projected q|k|v inputs
        self.ssm: mx.array | None = None  # [B, HV, Dv, Dk] float32
        self.offset = 0  # tokens seen

    @property
    def state(self) -> list[mx.array | None]:
        return [self.conv, self.ssm]

    @state.setter
    def state(self, v: list[mx.array | None]) -> None:
        self.conv, self.ssm = v

    @property
    def meta_state(self) -> tuple[str, ...]:
        return (str(self.offset),)

    @meta_state.setter
    def meta_state(self, v: tuple[str, ...]) -> None:
        self.offset = int(v[0])

    def empty(self) -> bool:
        return self.ssm is None

    def is_trimmable(self) -> bool:
        return False

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state if a is not None)


class AttnCache:
    def __init__(self, window: int | None = None, step: int = 256) -> None:
        self.window = window
        self.step = step
        self.keys: mx.array | None = None  # [B, Nkv, alloc, hd]
        self.values: mx.array | None = None
        self.fill = 0  # entries stored (the last `fill` tokens seen)
        self.offset = 0

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Append k, v [B, Nkv, L, hd]; return all stored + new entries (oldest first)."""
        L = k.shape[2]
        if self.window is None:
            return self._append(k, v)
        if self.keys is None:
            keys, values = k, v
        else:
            keys = mx.concatenate([self.keys[:, :, : self.fill], k], axis=2)
            values = mx.concatenate([self.values[:, :, : self.fill], v], axis=2)
        keep = keys.shape[2] if self.window is None else min(keys.shape[2], self.window - 1)
        self.keys, self.values = (
            keys[:, :, keys.shape[2] - keep :],
            values[:, :, keys.shape[2] - keep :],
        )
        self.fill = keep
        self.offset += L
        return keys, values

    def _append(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """No window: write into a buffer that grows in steps (no copy of the cache per call)."""
        B, N, L, hd = k.shape
        n = self.fill + L
        alloc = 0 if self.keys is None else self.keys.shape[2]
        if n > alloc:
            new = self.step * ((n + self.step - 1) // self.step)
            keys = mx.zeros((B, N, new, hd), dtype=k.dtype)
            values = mx.zeros((B, N, new, v.shape[3]), dtype=v.dtype)
            if self.fill:
                keys[:, :, : self.fill] = self.keys[:, :, : self.fill]
                values[:, :, : self.fill] = self.values[:, :, : self.fill]
            self.keys, self.values = keys, values
        self.keys[:, :, self.fill : n] = k
        self.values[:, :, self.fill : n] = v
        self.fill = n
        self.offset += L
        return self.keys[:, :, :n], self.values[:, :, :n]

    @property
    def state(self) -> list[mx.array | None]:
        if self.keys is None:
            return [None, None]
        return [self.keys[:, :, : self.fill], self.values[:, :, : self.fill]]

    @state.setter
    def state(self, v: list[mx.array | None]) -> None:
        self.keys, self.values = v
        self.fill = 0 if self.keys is None else self.keys.shape[2]

    @property
    def meta_state(self) -> tuple[str, ...]:
        return (str(self.offset), json.dumps(self.window))

    @meta_state.setter
    def meta_state(self, v: tuple[str, ...]) -> None:
        self.offset, self.window = int(v[0]), json.loads(v[1])

    def empty(self) -> bool:
        return self.keys is None

    def is_trimmable(self) -> bool:
        return False

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state if a is not None)


class HAMCache(GDNCache):
    """GDN state plus the compact cache of admitted tokens.

    The buffer's last slot is a scratch slot: tokens that are not admitted are written there, so
    that one scatter appends the admitted tokens of every row without host synchronisation.
    Host-side bookkeeping (`settle`) happens at the start of the next call, when the previous
    step's results are already computed.
    """

    def __init__(
        self,
        threshold: float | None = None,
        kv_budget: float | None = None,
        max_kv_tokens: int | None = None,
        kv_policy: str = "evict",
        step: int = 256,
    ) -> None:
        super().__init__()
        if max_kv_tokens is not None and max_kv_tokens < 1:
            raise ValueError(f"max_kv_tokens={max_kv_tokens!r} must be a positive integer")
        if kv_policy not in KV_POLICIES:
            raise ValueError(f"kv_policy={kv_policy!r}: expected one of {KV_POLICIES}")
        self.threshold = threshold
        self.kv_budget = kv_budget
        self.max_kv_tokens = max_kv_tokens
        self.kv_policy = kv_policy
        self.step = step
        self.budget = BudgetController(kv_budget) if kv_budget is not None else None
        self.keys: mx.array | None = None  # [B, H, alloc, Dk]
        self.values: mx.array | None = None  # [B, HV, alloc, Dv]
        self.positions: mx.array | None = None  # [B, alloc] int32
        self.scores: mx.array | None = None  # [B, alloc] float32
        self.count: mx.array | None = None  # [B] int32 admitted entries per row
        self.n_max = 0  # max(count) as of the last settle
        self._pending: tuple[mx.array, mx.array] | None = None  # last call's (score, admitted)
        self._appended = 0  # tokens appended since the last settle (bounds the new counts)

    # ---- host bookkeeping -------------------------------------------------------------------
    def settle(self) -> None:
        """Sync the counts, feed the budget controller, and evict down to max_kv_tokens.
        A no-op when nothing was appended since the last call (one host sync per step, not one
        per reader: the next layer call, kv_stats and `state` all settle)."""
        if self.count is None or self._appended == 0:
            return
        counts = np.array(self.count)
        if self._pending is not None and self.budget is not None:
            score, admitted = self._pending
            self.budget.observe(np.array(score), np.array(admitted))
        self._pending = None
        cap = self.max_kv_tokens
        if cap is not None and self.kv_policy == "evict" and counts.max() > cap:
            self._evict(counts, cap)
            counts = np.minimum(counts, cap)
        self.n_max = int(counts.max())
        self._appended = 0

    def _evict(self, counts: np.ndarray, cap: int) -> None:
        """Keep each row's `cap` highest-scoring entries (older first on ties), in slot order."""
        scores = np.array(self.scores)
        keep = np.zeros((len(counts), cap), dtype=np.int32)
        for b, n in enumerate(counts):
            if n <= cap:
                keep[b, :n] = np.arange(n)
                keep[b, n:] = n  # beyond the count: ignored
            else:
                order = np.argsort(-scores[b, :n], kind="stable")[:cap]
                keep[b] = np.sort(order)
        idx = mx.array(keep)  # [B, cap]
        head = idx[:, None, :, None]
        self.keys[:, :, :cap] = mx.take_along_axis(self.keys, head, axis=2)
        self.values[:, :, :cap] = mx.take_along_axis(self.values, head, axis=2)
        self.positions[:, :cap] = mx.take_along_axis(self.positions, idx, axis=1)
        self.scores[:, :cap] = mx.take_along_axis(self.scores, idx, axis=1)
        self.count = mx.minimum(self.count, cap)

    def threshold_override(self, score: mx.array) -> mx.array | float | None:
        """τ for this call from the user's controls ([B] or scalar), or None (use the layer's)."""
        if self.budget is not None:
            tau = self.budget.threshold()
            if tau is None:
                return calibrated_threshold(score, self.kv_budget)[:, None]
            return mx.array(tau)[:, None]
        return self.threshold

    def limit(self, admitted: mx.array) -> mx.array:
        """Apply the `reject` policy to admitted [B, L]: tokens that do not fit are refused."""
        if self.max_kv_tokens is None or self.kv_policy != "reject":
            return admitted
        total = mx.cumsum(admitted.astype(mx.int32), axis=1)  # [B, L]
        if self.count is not None:
            total = total + self.count[:, None]
        return admitted & (total <= self.max_kv_tokens)

    # ---- the buffer ---------------------------------------------------------------------------
    @property
    def bound(self) -> int:
        """An upper bound of every row's count, known on the host without a sync."""
        return self.n_max + self._appended

    def fetch(self) -> tuple[mx.array, mx.array, mx.array, mx.array, mx.array]:
        """After `append`: keys [B,H,n,Dk], values [B,HV,n,Dv], scores [B,n], positions [B,n],
        count [B], where n bounds every row's count (slots at or past a row's count are unused)."""
        n = self.bound
        return (
            self.keys[:, :, :n], self.values[:, :, :n], self.scores[:, :n],
            self.positions[:, :n], self.count,
        )  # fmt: skip

    def append(self, k: mx.array, v: mx.array, score: mx.array, admitted: mx.array) -> None:
        """Store the admitted tokens. k [B,H,L,Dk], v [B,HV,L,Dv], score/admitted [B,L]."""
        B, H, L, Dk = k.shape
        alloc = self.reserve(B, H, Dk, v.shape[1], v.shape[3], k.dtype, L)
        a = admitted.astype(mx.int32)
        slot = mx.where(admitted, self.count[:, None] + mx.cumsum(a, axis=1) - 1, alloc - 1)
        pos = mx.broadcast_to(mx.arange(self.offset, self.offset + L, dtype=mx.int32), (B, L))
        keys = mx.put_along_axis(self.keys, slot[:, None, :, None], k, axis=2)
        values = mx.put_along_axis(self.values, slot[:, None, :, None], v, axis=2)
        positions = mx.put_along_axis(self.positions, slot, pos, axis=1)
        scores = mx.put_along_axis(self.scores, slot, score.astype(mx.float32), axis=1)
        self.commit(keys, values, positions, scores, self.count + a.sum(axis=1), score, admitted)

    def reserve(self, B: int, H: int, Dk: int, HV: int, Dv: int, dtype: mx.Dtype, L: int) -> int:
        """Make room for L more entries (+ the scratch slot); returns the buffer length."""
        if self.count is None:
            self.count = mx.zeros((B,), dtype=mx.int32)
        alloc = 0 if self.keys is None else self.keys.shape[2]
        need = self.n_max + self._appended + L + 1  # + the scratch slot
        if need > alloc:
            new = self.step * ((need + self.step - 1) // self.step)
            keys = mx.zeros((B, H, new, Dk), dtype=dtype)
            values = mx.zeros((B, HV, new, Dv), dtype=dtype)
            positions = mx.zeros((B, new), dtype=mx.int32)
            scores = mx.zeros((B, new), dtype=mx.float32)
            n = self.n_max + self._appended
            if n:
                keys[:, :, :n] = self.keys[:, :, :n]
                values[:, :, :n] = self.values[:, :, :n]
                positions[:, :n] = self.positions[:, :n]
                scores[:, :n] = self.scores[:, :n]
            self.keys, self.values, self.positions, self.scores = keys, values, positions, scores
            alloc = new
        return alloc

    def commit(
        self,
        keys: mx.array,
        values: mx.array,
        positions: mx.array,
        scores: mx.array,
        count: mx.array,
        score: mx.array,
        admitted: mx.array,
    ) -> None:
        """Take the buffers after appending the tokens of one call (score/admitted [B, L])."""
        L = admitted.shape[1]
        self.keys, self.values, self.positions, self.scores = keys, values, positions, scores
        self.count = count
        self.offset += L
        self._appended += L
        self._pending = (score, admitted)

    # ---- protocol -----------------------------------------------------------------------------
    @property
    def state(self) -> list[mx.array | None]:
        self.settle()
        n = self.n_max
        if self.count is None:
            return [self.conv, self.ssm, None, None, None, None, None]
        return [
            self.conv, self.ssm, self.keys[:, :, :n], self.values[:, :, :n],
            self.positions[:, :n], self.scores[:, :n], self.count,
        ]  # fmt: skip

    @state.setter
    def state(self, v: list[mx.array | None]) -> None:
        self.conv, self.ssm, keys, values, positions, scores, self.count = v
        self.keys = self.values = None
        self.n_max = 0
        if self.count is None:
            return
        n = keys.shape[2]
        B, H, _, Dk = keys.shape
        HV, Dv = values.shape[1], values.shape[3]
        alloc = self.step * ((n + 1 + self.step - 1) // self.step)
        self.keys = mx.zeros((B, H, alloc, Dk), dtype=keys.dtype)
        self.values = mx.zeros((B, HV, alloc, Dv), dtype=values.dtype)
        self.positions = mx.zeros((B, alloc), dtype=mx.int32)
        self.scores = mx.zeros((B, alloc), dtype=mx.float32)
        self.keys[:, :, :n] = keys
        self.values[:, :, :n] = values
        self.positions[:, :n] = positions
        self.scores[:, :n] = scores
        self.n_max = n

    @property
    def meta_state(self) -> tuple[str, ...]:
        controls = {
            "threshold": self.threshold, "kv_budget": self.kv_budget,
            "max_kv_tokens": self.max_kv_tokens, "kv_policy": self.kv_policy,
        }  # fmt: skip
        return (str(self.offset), json.dumps(controls))

    @meta_state.setter
    def meta_state(self, v: tuple[str, ...]) -> None:
        self.offset = int(v[0])
        controls = json.loads(v[1])
        self.threshold = controls["threshold"]
        self.kv_budget = controls["kv_budget"]
        self.max_kv_tokens = controls["max_kv_tokens"]
        self.kv_policy = controls["kv_policy"]
        self.budget = BudgetController(self.kv_budget) if self.kv_budget is not None else None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state if a is not None)

    def admitted_counts(self) -> list[int]:
        self.settle()
        return [] if self.count is None else [int(c) for c in np.array(self.count)]


CACHE_CLASSES = {c.__name__: c for c in (GDNCache, AttnCache, HAMCache)}


def save_prompt_cache(path: str, cache: list[Any], metadata: dict[str, str] | None = None) -> None:
    """Save a list of layer caches (and string metadata) to one safetensors file."""
    arrays: dict[str, mx.array] = {}
    meta: dict[str, str] = {}
    for i, c in enumerate(cache):
        for j, a in enumerate(c.state):
            if a is not None:
                arrays[f"{i}.{j}"] = a
        meta[f"cache.{i}.class"] = type(c).__name__
        meta[f"cache.{i}.meta"] = json.dumps(list(c.meta_state))
        meta[f"cache.{i}.slots"] = str(len(c.state))
    meta["cache.layers"] = str(len(cache))
    for k, v in (metadata or {}).items():
        meta[f"user.{k}"] = str(v)
    mx.save_safetensors(str(path), arrays, metadata=meta)


def load_prompt_cache(path: str, return_metadata: bool = False):
    """Load what `save_prompt_cache` wrote: the list of caches (and the user metadata)."""
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
        n = int(meta["cache.layers"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: not a ham_mlx prompt cache ({e})") from e
    cache = []
    for i in range(n):
        name = meta[f"cache.{i}.class"]
        if name not in CACHE_CLASSES:
            raise ValueError(f"{path}: unknown cache class {name!r} for layer {i}")
        c = CACHE_CLASSES[name]()
        c.meta_state = tuple(json.loads(meta[f"cache.{i}.meta"]))
        slots = int(meta[f"cache.{i}.slots"])
        c.state = [arrays.get(f"{i}.{j}") for j in range(slots)]
        cache.append(c)
    user = {k[5:]: v for k, v in meta.items() if k.startswith("user.")}
    return (cache, user) if return_metadata else cache


def kv_stats(cache: list[Any]) -> list[dict[str, Any]]:
    """One dict per layer: type, admitted (per row), seen, kv_fraction, kv_bytes, full_kv_bytes."""
    stats = []
    for c in cache:
        if isinstance(c, HAMCache):
            admitted = c.admitted_counts()
            per_token = 0
            if c.keys is not None:
                per_token = c.keys.shape[1] * c.keys.shape[3] * c.keys.itemsize
                per_token += c.values.shape[1] * c.values.shape[3] * c.values.itemsize
            rows = max(len(admitted), 1)
            kind, seen = "ham", c.offset
            kv_bytes = sum(admitted) * per_token
            full = rows * seen * per_token
        elif isinstance(c, AttnCache):
            rows = 0 if c.keys is None else c.keys.shape[0]
            admitted = [c.fill] * rows
            per_token = (
                0 if c.keys is None else 2 * c.keys.shape[1] * c.keys.shape[3] * c.keys.itemsize
            )
            kind, seen = "attn", c.offset
            kv_bytes = rows * c.fill * per_token
            full = rows * seen * per_token
        else:
            kind, seen, admitted, kv_bytes, full = "gdn", c.offset, [], 0, 0
        fraction = [a / seen for a in admitted] if seen else [0.0 for _ in admitted]
        state_bytes = (
            0
            if getattr(c, "ssm", None) is None
            else c.ssm.nbytes + (c.conv.nbytes if c.conv is not None else 0)
        )
        stats.append({
            "type": kind, "admitted": admitted, "seen": seen, "kv_fraction": fraction,
            "kv_bytes": kv_bytes, "full_kv_bytes": full, "state_bytes": state_bytes,
        })  # fmt: skip
    return stats
