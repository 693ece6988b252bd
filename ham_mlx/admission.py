"""Which tokens a HAM layer stores: τ and capacity, in one place (spec §4.2, §7).

- `quantile_threshold` is the one rule for "the τ that admits a fraction f of n scores": midway
  between the k-th and the (k+1)-th largest score, k = ⌈f·n⌉ (+inf when k = 0, -inf when k = n),
  so that a τ frozen from these scores does not sit on one of them. kv_budget, the trainer's τ
  controller and the benchmarks all use it.
- `admit` is the one admission rule: score >= τ, real (unpadded) tokens only, and with the
  `reject` policy only while the row's cache has room. The general path and the one-token decode
  step both call it.
- `Admission` is the per-cache policy object: it owns τ (the trained buffer, a fixed override, or
  kv_budget's online controller, per row) and the capacity (`max_kv_tokens` with `evict` or
  `reject`). A HAM layer asks it once per call for τ [B, 1] and the cap.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np

KV_POLICIES = ("evict", "reject")
MAX_KV_TOKENS_LIMIT = 1 << 30  # a cap beyond this is a typo (or a tampered file), not a memory plan


def quantile_threshold(
    scores: mx.array, fraction: float | mx.array, counts: mx.array | None = None
) -> mx.array:
    """τ [...] that admits k = ⌈fraction·n⌉ of the n scores of each row of scores [..., N].

    fraction: a scalar or one per row [...]; counts [...]: the row's first `counts` entries are
    its scores (the rest is ignored), default all N. τ lies midway between the k-th and the
    (k+1)-th largest score (+inf when k = 0, -inf when k = n), so exactly k scores are >= τ
    (ties aside).
    """
    N = scores.shape[-1]
    scores = scores.astype(mx.float32)
    n = mx.array(N, dtype=mx.int32) if counts is None else counts.astype(mx.int32)
    if counts is not None:
        scores = mx.where(mx.arange(N) < n[..., None], scores, mx.inf)  # ignored entries last
    kept = mx.ceil(mx.array(fraction, dtype=mx.float32) * n - 1e-6).astype(mx.int32)
    kept = mx.broadcast_to(mx.clip(kept, 0, n), scores.shape[:-1])
    ascending = mx.sort(scores, axis=-1)
    index = mx.clip(n - kept, 0, N - 1)
    low = mx.take_along_axis(ascending, index[..., None], axis=-1)[..., 0]  # k-th largest
    below = mx.take_along_axis(ascending, mx.maximum(index - 1, 0)[..., None], axis=-1)[..., 0]
    tau = mx.where(kept >= n, -mx.inf, 0.5 * (low + below))
    return mx.where(kept <= 0, mx.inf, tau)


def admit(
    score: mx.array,
    tau: mx.array,
    valid: mx.array | None,
    count: mx.array,
    cap: mx.array | None,
) -> mx.array:
    """admitted [B, L] bool: score [B, L] >= τ ([B, 1] or scalar), only real tokens (valid
    [B, L], None = all), and with a `reject` cap [B] or scalar, only while count [B] + the tokens
    admitted so far in this call stay within it."""
    admitted = score >= tau
    if valid is not None:
        admitted = admitted & valid
    if cap is not None:
        total = mx.cumsum(admitted.astype(mx.int32), axis=1) + count[:, None]
        admitted = admitted & (total <= cap)
    return admitted


class BudgetRow:
    """kv_budget for one row: the next τ is the (1 - r) quantile of the row's recent scores, with
    rate r = budget + (budget * seen - admitted) / horizon paying back the error so far."""

    def __init__(self, budget: float, window: int = 512, horizon: int = 64):
        self.budget, self.window, self.horizon = budget, window, horizon
        self.recent = np.zeros((0,), dtype=np.float32)
        self.seen = 0
        self.admitted = 0

    def observe(self, score: np.ndarray, admitted: np.ndarray) -> None:
        """The row's real tokens of the last call: score [n] float, admitted [n] bool."""
        self.recent = np.concatenate([self.recent, score.astype(np.float32)])[-self.window :]
        self.seen += len(score)
        self.admitted += int(admitted.sum())

    @property
    def observed(self) -> bool:
        return self.seen > 0

    def history(self) -> dict:
        return {"recent": [float(x) for x in self.recent], "seen": self.seen,
                "admitted": self.admitted}  # fmt: skip

    def restore(self, h: Any, where: str) -> None:
        """Take `history()` back, checking it (a ValueError naming `where`)."""
        ok = isinstance(h, dict) and set(h) == {"recent", "seen", "admitted"}
        ok = ok and isinstance(h["recent"], list) and len(h["recent"]) <= self.window
        ok = ok and all(type(x) is float and math.isfinite(x) for x in h["recent"])
        ok = ok and all(type(h[k]) is int for k in ("seen", "admitted"))
        ok = ok and 0 <= h["admitted"] <= h["seen"] <= (1 << 40)
        ok = ok and len(h["recent"]) == min(h["seen"], self.window)
        if not ok:
            raise ValueError(f"{where} must hold 'recent' finite scores (at most {self.window}, "
                             "one per token seen) and counts 0 <= admitted <= seen")  # fmt: skip
        self.recent = np.array(h["recent"], dtype=np.float32)
        self.seen, self.admitted = h["seen"], h["admitted"]

    def rate(self) -> float:
        debt = self.budget * self.seen - self.admitted
        return float(np.clip(self.budget + debt / self.horizon, 0.0, 1.0))


def budget_thresholds(rows: Sequence[BudgetRow], steady: bool = False) -> mx.array:
    """τ [B] of observed budget rows from their recent scores (one quantile_threshold call).
    steady: the budget itself, no debt paid back (the value to freeze as a fixed threshold)."""
    width = max(len(r.recent) for r in rows)
    recent = np.full((len(rows), width), np.inf, dtype=np.float32)
    for b, r in enumerate(rows):
        recent[b, : len(r.recent)] = r.recent
    counts = mx.array([len(r.recent) for r in rows], dtype=mx.int32)
    rates = mx.array([r.budget if steady else r.rate() for r in rows], dtype=mx.float32)
    return quantile_threshold(mx.array(recent), rates, counts)


def check_controls(
    threshold: Any, kv_budget: Any, max_kv_tokens: Any, kv_policy: Any, where: str = ""
) -> None:
    """A clear ValueError for a control a user (or a file) got wrong."""
    at = f"{where}: " if where else ""
    for name, value in (("threshold", threshold), ("kv_budget", kv_budget)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{at}{name}={value!r} must be a number")
        if math.isnan(value):
            raise ValueError(f"{at}{name} is NaN")
    if kv_budget is not None and not 0.0 <= kv_budget <= 1.0:
        raise ValueError(f"{at}kv_budget={kv_budget!r} must lie in [0, 1]")
    if max_kv_tokens is not None and (
        isinstance(max_kv_tokens, bool)
        or not isinstance(max_kv_tokens, int)
        or not 1 <= max_kv_tokens <= MAX_KV_TOKENS_LIMIT
    ):
        raise ValueError(
            f"{at}max_kv_tokens={max_kv_tokens!r} must be an integer in [1, {MAX_KV_TOKENS_LIMIT}]"
        )
    if kv_policy not in KV_POLICIES:
        raise ValueError(f"{at}kv_policy={kv_policy!r}: expected one of {KV_POLICIES}")


class Admission:
    """τ and capacity of one HAM layer's cache, per row.

    threshold: a fixed τ instead of the trained one (None: trained); kv_budget: a target admitted
    fraction, τ adapts online per row (overrides threshold); max_kv_tokens: a cap per row, with
    kv_policy "evict" (the cache drops its lowest-scoring entries) or "reject" (refuse new tokens).
    Rows exist once the batch size is known; merged batches may carry different τ per row.
    """

    def __init__(
        self,
        threshold: float | None = None,
        kv_budget: float | None = None,
        max_kv_tokens: int | None = None,
        kv_policy: str = "evict",
    ) -> None:
        check_controls(threshold, kv_budget, max_kv_tokens, kv_policy)
        self.threshold = threshold
        self.kv_budget = kv_budget
        self.max_kv_tokens = max_kv_tokens
        self.kv_policy = kv_policy
        self.thresholds: list[float | None] | None = None  # per row
        self.budgets: list[BudgetRow | None] | None = None  # per row
        self._pending: tuple[mx.array, mx.array, mx.array | None] | None = None

    # ---- rows ---------------------------------------------------------------------------------
    def ensure_rows(self, B: int) -> None:
        if self.thresholds is None:
            self.thresholds = [self.threshold] * B
            self.budgets = [
                None if self.kv_budget is None else BudgetRow(self.kv_budget) for _ in range(B)
            ]
        elif len(self.thresholds) != B:
            raise ValueError(f"batch of {B} rows for a cache of {len(self.thresholds)} rows")

    @property
    def rows(self) -> int | None:
        return None if self.thresholds is None else len(self.thresholds)

    def select(self, rows: Sequence[int]) -> Admission:
        out = self._like()
        if self.thresholds is not None:
            out.thresholds = [self.thresholds[i] for i in rows]
            out.budgets = [self.budgets[i] for i in rows]
        return out

    @classmethod
    def concat(cls, parts: Sequence[Admission], sizes: Sequence[int]) -> Admission:
        first = parts[0]
        for p in parts[1:]:
            if (p.max_kv_tokens, p.kv_policy) != (first.max_kv_tokens, first.kv_policy):
                raise ValueError(
                    "cannot batch HAM caches with different max_kv_tokens/kv_policy: "
                    f"{(first.max_kv_tokens, first.kv_policy)} and {(p.max_kv_tokens, p.kv_policy)}"
                )
        out = first._like()
        out.thresholds, out.budgets = [], []
        for p, n in zip(parts, sizes):
            p.settle_pending()
            p.ensure_rows(n)
            out.thresholds += p.thresholds
            out.budgets += p.budgets
        return out

    def _like(self) -> Admission:
        return Admission(self.threshold, self.kv_budget, self.max_kv_tokens, self.kv_policy)

    # ---- per call -----------------------------------------------------------------------------
    @property
    def reject_cap(self) -> int | None:
        return self.max_kv_tokens if self.kv_policy == "reject" else None

    @property
    def evict_cap(self) -> int | None:
        return self.max_kv_tokens if self.kv_policy == "evict" else None

    def needs_scores(self) -> bool:
        """Whether τ for the next call depends on that call's own scores (a budget row that has
        observed nothing yet calibrates on them)."""
        return self.budgets is not None and any(b is not None and not b.observed
                                                for b in self.budgets)  # fmt: skip

    def tau(
        self, trained: mx.array, score: mx.array | None = None, valid: mx.array | None = None
    ) -> mx.array:
        """τ for this call: [B, 1], or the trained scalar when no row overrides it.

        score [B, L] (and valid [B, L]) are needed only when `needs_scores()`."""
        self.settle_pending()
        if self.thresholds is None or all(t is None for t in self.thresholds) and all(
            b is None for b in self.budgets
        ):
            return trained
        B = len(self.thresholds)
        fixed = [math.nan if t is None else float(t) for t in self.thresholds]
        tau = mx.where(mx.isnan(mx.array(fixed)), trained, mx.array(fixed))  # [B]
        observed = [b is not None and b.observed for b in self.budgets]
        if any(observed):
            rows = [i for i in range(B) if observed[i]]
            online = budget_thresholds([self.budgets[i] for i in rows])
            tau = _put_rows(tau, rows, online)
        fresh = [i for i in range(B) if self.budgets[i] is not None and not observed[i]]
        if fresh:
            if score is None:
                raise ValueError("kv_budget rows without history need this call's scores")
            counts = None if valid is None else valid.astype(mx.int32).sum(axis=1)
            budget = mx.array([b.budget if b is not None else 0.0 for b in self.budgets])
            calibrated = quantile_threshold(score, budget, counts)  # [B]
            tau = _put_rows(tau, fresh, calibrated[mx.array(fresh)])
        return tau[:, None]

    def observe(self, score: mx.array, admitted: mx.array, valid: mx.array | None) -> None:
        """Remember the call's scores for kv_budget (read on the host at the next call)."""
        if self.budgets is not None and any(b is not None for b in self.budgets):
            self._pending = (score, admitted, valid)

    def settle_pending(self) -> None:
        if self._pending is None:
            return
        score, admitted, valid = (None if a is None else np.array(a) for a in self._pending)
        self._pending = None
        for b, row in enumerate(self.budgets):
            if row is None:
                continue
            keep = slice(None) if valid is None else valid[b]
            row.observe(score[b][keep], admitted[b][keep])

    def steady_thresholds(self) -> np.ndarray | None:
        """τ [B] that admits each budget row's target of its recent scores (no debt): the values
        to freeze as fixed thresholds. None unless every row has a budget that has observed."""
        self.settle_pending()
        if self.budgets is None or not all(b is not None and b.observed for b in self.budgets):
            return None
        return np.array(budget_thresholds(self.budgets, steady=True))

    def freeze(self, thresholds: Sequence[float] | None) -> Admission:
        """A copy with fixed per-row thresholds instead of budgets (None: this object itself)."""
        if thresholds is None:
            return self
        out = Admission(None, None, self.max_kv_tokens, self.kv_policy)
        out.thresholds = [float(t) for t in thresholds]
        out.budgets = [None] * len(out.thresholds)
        return out

    # ---- files --------------------------------------------------------------------------------
    def to_json(self) -> dict:
        self.settle_pending()
        return {
            "threshold": self.threshold, "kv_budget": self.kv_budget,
            "max_kv_tokens": self.max_kv_tokens, "kv_policy": self.kv_policy,
            "row_thresholds": self.thresholds,
            "row_budgets": None if self.budgets is None else [
                None if b is None else b.budget for b in self.budgets
            ],
            "row_history": None if self.budgets is None else [
                None if b is None else b.history() for b in self.budgets
            ],
        }  # fmt: skip

    @classmethod
    def from_json(cls, d: Any, rows: int | None, where: str) -> Admission:
        """Rebuild from `to_json`, checking every field (kv_budget rows with their history)."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: HAM controls must be a JSON object")
        keys = {"threshold", "kv_budget", "max_kv_tokens", "kv_policy", "row_thresholds",
                "row_budgets", "row_history"}  # fmt: skip
        if set(d) != keys:
            raise ValueError(f"{where}: HAM controls have keys {sorted(d)}, expected "
                             f"{sorted(keys)}")  # fmt: skip
        per_row = (d["row_thresholds"], d["row_budgets"])
        numbers = [("threshold", d["threshold"]), ("kv_budget", d["kv_budget"])] + [
            (name, v) for name, p in zip(("row_thresholds", "row_budgets"), per_row)
            if isinstance(p, list) for v in p
        ]  # fmt: skip
        for name, v in numbers:  # a JSON integer beyond a float's range breaks the math below
            if type(v) is int and abs(v) > sys.float_info.max:
                raise ValueError(f"{where}: {name} holds an integer too large for a float")
        check_controls(d["threshold"], d["kv_budget"], d["max_kv_tokens"], d["kv_policy"], where)
        out = cls(d["threshold"], d["kv_budget"], d["max_kv_tokens"], d["kv_policy"])
        if all(p is None for p in per_row):
            return out
        n = rows if rows is not None else len(per_row[0]) if isinstance(per_row[0], list) else -1
        for name, p in zip(("row_thresholds", "row_budgets"), per_row):
            if not isinstance(p, list) or len(p) != n:
                raise ValueError(f"{where}: {name} must be a list of one value per row ({rows})")
        for t, b in zip(*per_row):
            check_controls(t, b, None, "evict", where)
        out.thresholds = list(d["row_thresholds"])
        out.budgets = [None if b is None else BudgetRow(b) for b in d["row_budgets"]]
        history = d["row_history"]
        if not isinstance(history, list) or len(history) != len(out.budgets):
            raise ValueError(f"{where}: row_history must be a list of one entry per row")
        for b, (row, h) in enumerate(zip(out.budgets, history)):
            if (row is None) != (h is None):
                raise ValueError(f"{where}: row_history[{b}] must be given exactly for budget rows")
            if row is not None:
                row.restore(h, f"{where}: row_history[{b}]")
        return out


def _put_rows(values: mx.array, rows: list[int], new: mx.array) -> mx.array:
    """values [B] with values[rows] replaced by new [len(rows)]."""
    out = values
    out[mx.array(rows)] = new.astype(values.dtype)
    return out
