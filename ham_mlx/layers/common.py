"""Small pieces shared by the mixers: the causal short convolution, the q/k l2 norm, the gated
output norm, and the switches of the one-token decode fast path."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from ham_mlx.ops import c_helpers, cpu_conv, fast_math

# One-token decode of GDN/HAM layers runs a fixed-shape step function (`decode_step` in gdn.py
# and ham.py) instead of the general path, mx.compile'd so that its elementwise ops fuse.
# HAM_MLX_NO_FAST_DECODE=1 takes the general path; HAM_MLX_NO_COMPILE=1 runs the step uncompiled.
FAST_DECODE = os.environ.get("HAM_MLX_NO_FAST_DECODE", "") in ("", "0")
COMPILE = os.environ.get("HAM_MLX_NO_COMPILE", "") in ("", "0")
_COMPILED: dict[object, Callable] = {}


def maybe_compiled(fn: Callable, key: object) -> Callable:
    """mx.compile(fn), built once per key (the static configuration fn closes over), or fn itself
    when COMPILE is off. mx.compile retraces by itself when input shapes change."""
    if not COMPILE:
        return fn
    if key not in _COMPILED:
        _COMPILED[key] = mx.compile(fn)
    return _COMPILED[key]


class DecodePlan(NamedTuple):
    """One token through a mixer as a pure function of arrays (the fixed-shape decode path):
    `step(params, x, *state) -> (y, *outs)`, then `finish(outs)` writes outs to the cache.
    `key` names everything `step` closes over (its compile cache key)."""

    key: tuple
    step: Callable
    params: dict
    state: tuple
    finish: Callable[[list], None]


def run_plan(plan: DecodePlan, x: mx.array) -> mx.array:
    """The mixer's output y for x [B, 1, D], through its compiled step; updates the cache."""
    y, *outs = maybe_compiled(plan.step, plan.key)(plan.params, x, *plan.state)
    plan.finish(outs)
    return y


def l2norm(x: mx.array, eps: float = 1e-6) -> mx.array:
    """x / sqrt(sum(x^2) + eps) over the last axis (eps inside the root, as FLA)."""
    return x * mx.rsqrt(mx.sum(x * x, axis=-1, keepdims=True) + eps)


def causal_short_conv(
    x: mx.array,
    weight: mx.array,
    prev: mx.array | None,
    ends: np.ndarray | None = None,
    cached: bool = False,
) -> tuple[mx.array, mx.array | None]:
    """Depthwise causal conv + SiLU (spec §3 step 2).

    x [B, L, C] raw projected inputs; weight [C, Kc, 1] (tap Kc-1 multiplies the current token);
    prev [B, Kc-1, C] the inputs before x (None: zeros); ends [B]: row b's real tokens end at
    ends[b] <= L (right padding; None: all L). cached: a call that fills a cache, which no
    gradient goes through: on the CPU a float32 one of at least `c_helpers.MIN_TOKENS` tokens may
    run as one C call (`cpu_conv.short_conv_c`). Returns (SiLU(conv) [B, L, C], the last Kc-1
    real inputs [B, Kc-1, C] for the cache, None when Kc = 1).
    """
    B, L, C = x.shape
    Kc = weight.shape[1]
    if Kc == 1:
        return fast_math.silu(x * weight[:, 0, 0]), None
    unpadded = ends is None or (ends == L).all()
    c_form = cached and unpadded and L >= c_helpers.MIN_TOKENS and x.dtype == mx.float32
    if c_form and cpu_conv.available():
        y = cpu_conv.short_conv_c(x, weight[:, :, 0].T, prev)
        if L >= Kc - 1:
            return y, own_copy(x[:, L - (Kc - 1) :])
        prev = mx.zeros((B, Kc - 1, C), dtype=x.dtype) if prev is None else prev
        return y, mx.concatenate([prev.astype(x.dtype), x], axis=1)[:, -(Kc - 1) :]
    if prev is None:
        prev = mx.zeros((B, Kc - 1, C), dtype=x.dtype)
    xp = mx.concatenate([prev.astype(x.dtype), x], axis=1)  # [B, Kc-1+L, C]
    # compiled: the taps and the SiLU fuse into one pass (eager, each tap is a pass over [L, C])
    y = maybe_compiled(conv_taps, "conv_taps")(xp, weight[:, :, 0].T)
    if unpadded:
        return y, xp[:, -(Kc - 1) :] if L == 1 else own_copy(xp[:, -(Kc - 1) :])
    index = mx.array(ends.astype(np.int32))[:, None] + mx.arange(Kc - 1, dtype=mx.int32)[None]
    return y, mx.take_along_axis(xp, index[..., None], axis=1)


def own_copy(tail: mx.array) -> mx.array:
    """The last inputs a cache keeps, copied out of the call's (much larger) array, which a view
    would hold in memory until the next call."""
    return mx.contiguous(tail)


def conv_taps(xp: mx.array, w: mx.array) -> mx.array:
    """SiLU(Σ_i xp[:, i : i + L] * w[i]): xp [B, Kc-1+L, C], w [Kc, C]. Returns [B, L, C]."""
    Kc = w.shape[0]
    L = xp.shape[1] - (Kc - 1)
    y = xp[:, 0:L] * w[0:1]  # w[i : i + 1] is a view, w[i] would be a gather
    for i in range(1, Kc):
        y = y + xp[:, i : i + L] * w[i : i + 1]
    return fast_math.silu(y)


def gated_rms_norm(
    x: mx.array, gate: mx.array | None, weight: mx.array, eps: float, activation: str
) -> mx.array:
    """FLA's gated output norm: RMSNorm(x) * weight * act(gate) over the last axis (Dv)."""
    y = mx.fast.rms_norm(x, weight, eps)
    if gate is None:
        return y
    return y * (fast_math.sigmoid(gate) if activation == "sigmoid" else fast_math.silu(gate))


def check_cache(cache: object, expected: type, layer: str) -> None:
    """A clear error when a layer is handed a cache it cannot honour (another library's, or
    another layer type's)."""
    if cache is not None and not isinstance(cache, expected):
        raise TypeError(
            f"a {layer} layer needs a ham_mlx {expected.__name__}, got {type(cache).__name__}; "
            "make caches with model.make_cache() (mlx-lm's own KV caches, quantized or rotating, "
            "are not supported)"
        )
