"""Per-layer threshold control during training (spec §6).

A batch is routed with the thresholds of earlier steps; afterwards each HAM layer's τ moves a
fraction `rate` of the way toward the (1 - target) quantile of that batch's scores. From a cold
start (an untrained RNN finds everything surprising) τ follows the score distribution within a few
tens of steps, and as training shifts the distribution, τ tracks it. All in-graph, so it runs
inside the compiled step; with data parallelism the scores are gathered first, so every rank (and
a single process with the same global batch) computes the same τ.
"""

from __future__ import annotations

import mlx.core as mx


def batch_quantile(scores: mx.array, fraction_kept: float) -> mx.array:
    """The score above which `fraction_kept` of the entries of scores lie (a scalar)."""
    flat = mx.sort(scores.reshape(-1))
    n = flat.size
    index = min(max(int(round((1.0 - fraction_kept) * n)), 0), n - 1)
    return flat[index]


def update_thresholds(layers, scores: list[mx.array], targets: list[float], rate: float) -> None:
    """Move each HAM layer's `threshold` buffer toward its batch quantile."""
    for layer, s, target in zip(layers, scores, targets, strict=True):
        goal = batch_quantile(mx.stop_gradient(s), target)
        layer.threshold = layer.threshold + rate * (goal - layer.threshold)


def kept_fraction(scores: mx.array, threshold: mx.array) -> mx.array:
    return mx.mean((scores >= threshold).astype(mx.float32))
