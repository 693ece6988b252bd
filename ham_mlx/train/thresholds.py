"""Per-layer threshold control during training (spec §6).

A batch is routed with the thresholds of earlier steps; afterwards each HAM layer's τ moves a
fraction of the way toward the (1 - target) quantile of that batch's scores. The fraction
(`controller_rate`) is 1 during the learning-rate warmup (at least the first step): τ is the
previous batch's quantile, so it starts at the first batch's quantile instead of the configured
initial value and keeps up while the score distribution moves fastest (a smaller rate lags a
moving distribution by about (1 - rate) / rate steps). Then it is `threshold_rate`, an
exponential average over batches that smooths out their sampling noise.
All in-graph, so it runs inside the compiled step (the rate is an input, not a constant); with
data parallelism the scores are gathered first, so every rank (and a single process with the
same global batch) computes the same τ.
"""

from __future__ import annotations

import mlx.core as mx

from ham_mlx.admission import quantile_threshold


def controller_rate(step: int, rate: float, fast_steps: int) -> float:
    """The controller's rate at optimizer step `step` (0 = the first): 1 before
    max(fast_steps, 1) (the trainer passes its warmup), then `rate`."""
    return 1.0 if step < max(fast_steps, 1) else rate


def batch_quantile(scores: mx.array, fraction_kept: float) -> mx.array:
    """The τ that admits `fraction_kept` of the entries of scores (a scalar): the one quantile
    rule of `ham_mlx.admission`, kept finite (just outside the scores when it admits none or
    all) so that τ can move toward it."""
    flat = scores.reshape(-1)
    tau = quantile_threshold(flat, fraction_kept)
    return mx.clip(tau, mx.min(flat) - 1e-3, mx.max(flat) + 1e-3)


def update_thresholds(
    layers, scores: list[mx.array], targets: list[float], rate: float | mx.array
) -> None:
    """Move each HAM layer's `threshold` buffer a fraction `rate` toward its batch quantile."""
    for layer, s, target in zip(layers, scores, targets, strict=True):
        goal = batch_quantile(mx.stop_gradient(s), target)
        layer.threshold = layer.threshold + rate * (goal - layer.threshold)


def kept_fraction(scores: mx.array, threshold: mx.array) -> mx.array:
    return mx.mean((scores >= threshold).astype(mx.float32))
