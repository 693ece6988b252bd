"""Small pieces shared by the mixers: the causal short convolution and the q/k l2 norm."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def l2norm(x: mx.array, eps: float = 1e-6) -> mx.array:
    """x / sqrt(sum(x^2) + eps) over the last axis (eps inside the root, as FLA)."""
    return x * mx.rsqrt(mx.sum(x * x, axis=-1, keepdims=True) + eps)


def causal_short_conv(
    x: mx.array, weight: mx.array, prev: mx.array | None
) -> tuple[mx.array, mx.array | None]:
    """Depthwise causal conv + SiLU (spec §3 step 2).

    x [B, L, C] raw projected inputs; weight [C, Kc, 1] (tap Kc-1 multiplies the current token);
    prev [B, Kc-1, C] the inputs before x (None: zeros). Returns (SiLU(conv) [B, L, C], the last
    Kc-1 inputs [B, Kc-1, C] for the cache, None when Kc = 1).
    """
    B, L, C = x.shape
    Kc = weight.shape[1]
    if Kc == 1:
        return nn.silu(x * weight[:, 0, 0]), None
    if prev is None:
        prev = mx.zeros((B, Kc - 1, C), dtype=x.dtype)
    xp = mx.concatenate([prev.astype(x.dtype), x], axis=1)  # [B, Kc-1+L, C]
    w = weight[:, :, 0].T  # [Kc, C]
    y = xp[:, 0:L] * w[0]
    for i in range(1, Kc):
        y = y + xp[:, i : i + L] * w[i]
    return nn.silu(y), xp[:, -(Kc - 1) :]


def gated_rms_norm(
    x: mx.array, gate: mx.array | None, weight: mx.array, eps: float, activation: str
) -> mx.array:
    """FLA's gated output norm: RMSNorm(x) * weight * act(gate) over the last axis (Dv)."""
    y = mx.fast.rms_norm(x, weight, eps)
    if gate is None:
        return y
    return y * (mx.sigmoid(gate) if activation == "sigmoid" else nn.silu(gate))
