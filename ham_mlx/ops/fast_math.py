"""exp, 2^x, sigmoid and SiLU for float32 on the CPU, 3-4x faster than MLX's there.

MLX's CPU build computes exp with scalar calls to `std::fma` and `std::floor` per element (no
SIMD on x86), about 13 ns an element. The same Cephes polynomial written as MLX array ops (the
rounding by the 1.5 * 2^23 trick, the polynomial in Estrin's form to keep the fused graph shallow,
the power of two built in the exponent bits) compiles into vectorised loops under `mx.compile`.
The error matches MLX's own exp (a few float32 ulp); inputs below -88 give exactly 0, like MLX;
inputs above 88 give about 3e38 instead of inf. Each function has a hand-written gradient.

`enabled()` is true when arrays are computed on the CPU and HAM_MLX_NO_FAST_MATH is unset;
otherwise every function here is MLX's own (on a GPU those are already fast). Arrays of fewer
than MIN_SIZE elements also get MLX's own function: its one operation fuses with its neighbours,
where these forms take a few kernels of their own (about 20 µs), which costs more than MLX's slow
exp saves below about 1400 elements (a decode step's gates and short softmaxes). The decision is
taken when a function is traced, so a compiled function keeps the form it was traced with.
Twins: `mx.exp`, `mx.sigmoid`, `nn.silu` (tests/test_fast_math.py compares them).
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn

LOG2E = 1.4426950408889634
_ROUND = 12582912.0  # 1.5 * 2^23: (y + R) - R rounds |y| < 2^22 to the nearest integer
# 2^f = exp(f ln 2) on [-0.5, 0.5]: the Cephes coefficients MLX's exp uses, lowest first.
_P = (1.0, 6.931472028550421e-1, 2.402264791363012e-1, 5.550332471162809e-2,
      9.618437357674640e-3, 1.339887440266574e-3, 1.535336188319500e-4)  # fmt: skip


def enabled() -> bool:
    return mx.default_device() == mx.cpu and os.environ.get("HAM_MLX_NO_FAST_MATH", "") in ("", "0")


def _pow2(y: mx.array) -> mx.array:
    """2^y for float32 y: 2^n from the exponent bits times a polynomial in f = y - n."""
    y = mx.clip(y, -127.0, 127.0)  # n = -127 writes exponent bits 0: the result is +0
    n = (y + _ROUND) - _ROUND
    f = y - n
    f2 = f * f
    c0, c1, c2, c3, c4, c5, c6 = _P
    p = (c0 + c1 * f) + f2 * ((c2 + c3 * f) + f2 * ((c4 + c5 * f) + f2 * c6))
    scale = ((n.astype(mx.int32) + 127) << 23).view(mx.float32)
    return p * scale


# Compiled (fused) even when called outside mx.compile: run op by op, these forms would be slower
# than MLX's own functions (mx.compile traces once per input shape).
_exp2_fused = mx.compile(_pow2)
_exp_fused = mx.compile(lambda x: _pow2(x * LOG2E))
_sigmoid_fused = mx.compile(lambda x: 1.0 / (1.0 + _pow2(x * -LOG2E)))
_silu_fused = mx.compile(lambda x: x / (1.0 + _pow2(x * -LOG2E)))


def _silu_grad(x: mx.array, cotangent: mx.array) -> mx.array:
    s = _sigmoid_fused(x)
    return cotangent * (s * (1.0 + x * (1.0 - s)))


_silu_grad_fused = mx.compile(_silu_grad)


@mx.custom_function
def _exp2_cpu(y: mx.array) -> mx.array:
    return _exp2_fused(y)


@_exp2_cpu.vjp
def _exp2_vjp(primals, cotangent, output):
    return (cotangent * output * 0.6931471805599453,)


@mx.custom_function
def _exp_cpu(x: mx.array) -> mx.array:
    return _exp_fused(x)


@_exp_cpu.vjp
def _exp_vjp(primals, cotangent, output):
    return (cotangent * output,)


@mx.custom_function
def _sigmoid_cpu(x: mx.array) -> mx.array:
    return _sigmoid_fused(x)


@_sigmoid_cpu.vjp
def _sigmoid_vjp(primals, cotangent, output):
    return (cotangent * (output * (1.0 - output)),)


@mx.custom_function
def _silu_cpu(x: mx.array) -> mx.array:
    return _silu_fused(x)


@_silu_cpu.vjp
def _silu_vjp(primals, cotangent, output):
    x = primals[0] if isinstance(primals, (tuple, list)) else primals  # one input: the array
    return (_silu_grad_fused(x, cotangent),)


MIN_SIZE = 1024


def _use_fast(x: mx.array) -> bool:
    return x.dtype == mx.float32 and x.size >= MIN_SIZE and enabled()


def exp(x: mx.array) -> mx.array:
    return _exp_cpu(x) if _use_fast(x) else mx.exp(x)


def exp2(x: mx.array) -> mx.array:
    return _exp2_cpu(x) if _use_fast(x) else mx.power(2.0, x)


def sigmoid(x: mx.array) -> mx.array:
    return _sigmoid_cpu(x) if _use_fast(x) else mx.sigmoid(x)


def silu(x: mx.array) -> mx.array:
    return _silu_cpu(x) if _use_fast(x) else nn.silu(x)
