"""Training lanes: one micro-batch split by rows over `ham_mlx.lanes.Lanes`.

Each part's loss and gradient are computed and evaluated on a lane; `combine` weights each part
by its share of the micro-batch's counted tokens, so the loss and the gradient equal the whole
micro-batch's up to float rounding. `default_lanes()`: HAM_MLX_TRAIN_LANES, else 2 on a CPU device
with two or more CPUs, else 1. Twin: lanes=1, the micro-batch in one piece.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from ham_mlx.lanes import Lanes, on_cpu_cores

__all__ = ["Lanes", "combine", "default_lanes", "split_rows", "split_step", "token_shares"]


def default_lanes() -> int:
    """HAM_MLX_TRAIN_LANES when set, else 2 on a CPU device with >= 2 CPUs, else 1."""
    given = os.environ.get("HAM_MLX_TRAIN_LANES", "").strip()
    if given:
        if not given.isdigit() or int(given) < 1:
            raise ValueError(f"HAM_MLX_TRAIN_LANES={given!r}: must be an integer >= 1")
        return int(given)
    return on_cpu_cores()


def split_rows(arrays: Sequence[np.ndarray | None], n: int) -> list[tuple[np.ndarray | None, ...]]:
    """The rows of each array cut into min(n, rows) consecutive parts of near-equal size."""
    rows = next(a.shape[0] for a in arrays if a is not None)
    bounds = np.linspace(0, rows, min(n, rows) + 1).round().astype(int)
    return [
        tuple(None if a is None else a[lo:hi] for a in arrays)
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]


def combine(outs: list[tuple[mx.array, Any, list[mx.array]]], weights: Sequence[float]):
    """(loss, grads, scores) of the parts -> the whole batch's: loss and gradients weighted by
    the parts' shares of its counted tokens, each HAM layer's scores concatenated by rows."""
    if len(outs) == 1:
        return outs[0]
    loss = sum(w * o[0] for w, o in zip(weights, outs))
    grads = tree_map(lambda *g: sum(w * x for w, x in zip(weights, g)), *[o[1] for o in outs])
    scores = [mx.concatenate(layer) for layer in zip(*[o[2] for o in outs])]
    return loss, grads, scores


def token_shares(masks: Sequence[np.ndarray]) -> list[float]:
    """Each part's share of the counted (mask) tokens; equal shares when none is counted."""
    counts = [float(m.sum()) for m in masks]
    total = sum(counts)
    return [c / total for c in counts] if total > 0 else [1 / len(counts)] * len(counts)


def split_step(lanes: Lanes, micro: Callable[..., Any], x: mx.array, y: mx.array, mask: mx.array):
    """micro(x, y, mask) -> (loss, grads, scores) for the rows split over the lanes, combined
    into the whole batch's."""
    parts = split_rows((x, y, mask), lanes.n)
    return combine(lanes.run(micro, parts), token_shares([p[2] for p in parts]))
