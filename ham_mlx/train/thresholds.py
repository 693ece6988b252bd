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

from ham_mlx.admission import quantile_threshold


def batch_quantile(scores: mx.array, fraction_kept: float) -> mx.array:
    """The τ that admits `fraction_kept` of the entries of scores (a scalar): the one quantile
    rule of `ham_mlx.admission`, kept finite (just outside the scores when it admits none or
    all) so that τ can move toward it."""
    flat = scores.reshape(-1)
    tau = quantile_threshold(flat, fraction_kept)
    return mx.clip(tau, mx.min(flat) - 1e-3, mx.max(flat) + 1e-3)


def update_thresholds(layers, scores: list[mx.array], targets: list[float], rate: float) -> None:
    """Move each HAM layer's `threshold` buffer toward its batch quantile."""
    for layer, s, target in zip(layers, scores, targets, strict=True):
        goal = batch_quantile(mx.stop_gradient(s), target)
        layer.threshold = layer.threshold + rate * (goal - layer.threshold)


def kept_fraction(scores: mx.array, threshold: mx.array) -> mx.array:
    return mx.mean((scores >= threshold).astype(mx.float32))
