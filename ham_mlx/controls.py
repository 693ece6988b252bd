"""Online threshold control for `kv_budget` at inference (spec §7)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def calibrated_threshold(score: mx.array, fraction: float) -> mx.array:
    """τ [B] that admits ceil(fraction * L) tokens of each row of score [B, L] (ties aside)."""
    L = score.shape[-1]
    n = int(np.ceil(fraction * L - 1e-9))
    if n <= 0:
        return mx.full(score.shape[:-1], mx.inf)
    return mx.sort(score, axis=-1)[..., L - n]


class BudgetController:
    """Per-row threshold that holds the admitted fraction of a layer near `budget`.

    Before each forward call the next τ is the (1 - r) quantile of the row's recent scores, where
    the rate r = budget + (budget * seen - admitted) / horizon pays back the error so far. Before
    any scores exist, the layer calibrates τ on the call's own scores (`calibrated_threshold`).
    """

    def __init__(self, budget: float, window: int = 512, horizon: int = 64):
        if not 0.0 <= budget <= 1.0:
            raise ValueError(f"kv_budget={budget!r} must lie in [0, 1]")
        self.budget = budget
        self.window = window
        self.horizon = horizon
        self.recent: np.ndarray | None = None  # [B, <= window] recent scores
        self.seen = 0
        self.admitted: np.ndarray | None = None  # [B]

    def observe(self, score: np.ndarray, admitted: np.ndarray) -> None:
        """score [B, L] float, admitted [B, L] bool of the last call."""
        recent = score if self.recent is None else np.concatenate([self.recent, score], axis=1)
        self.recent = recent[:, -self.window :]
        self.seen += score.shape[1]
        counts = admitted.sum(axis=1)
        self.admitted = counts if self.admitted is None else self.admitted + counts

    def threshold(self) -> np.ndarray | None:
        """τ [B] for the next call, or None before any observation."""
        if self.recent is None:
            return None
        debt = self.budget * self.seen - self.admitted  # [B]
        rate = np.clip(self.budget + debt / self.horizon, 0.0, 1.0)
        tau = np.empty(len(rate), dtype=np.float32)
        for b, r in enumerate(rate):
            if r <= 0.0:
                tau[b] = np.inf
            elif r >= 1.0:
                tau[b] = -np.inf
            else:
                tau[b] = np.quantile(self.recent[b], 1.0 - r)
        return tau

    def steady_threshold(self) -> np.ndarray | None:
        """τ [B] that admits `budget` of the recent scores, with no debt paid back: the value to
        freeze as a fixed threshold (None before any observation)."""
        if self.recent is None:
            return None
        if self.budget <= 0.0:
            return np.full(len(self.recent), np.inf, dtype=np.float32)
        return np.quantile(self.recent, 1.0 - self.budget, axis=1).astype(np.float32)
