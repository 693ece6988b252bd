"""The short causal convolution and its SiLU as one C call on the CPU, for cached prefill.

MLX runs `causal_short_conv` as a concatenation with the cached inputs and one compiled function
for the taps and the SiLU (about 13 ms for 1024 tokens of the `base` preset's 3072 channels
here). The C helper (`ham_mlx/_conv_cpu.c`, compiled by `pip install` where a C compiler exists)
reads x once, keeps the taps and the SiLU in registers and shares the tokens among threads.

`available()` is true on Linux when the helper was built and OpenBLAS was loaded (the Linux CPU
path), and HAM_MLX_NO_C_CONV is unset. Its twin is `ham_mlx.layers.common.causal_short_conv`'s
MLX form (tests/test_cpu_conv.py compares them). No gradient: this serves cached prefill only.
"""

from __future__ import annotations

import ctypes

import mlx.core as mx
import numpy as np

from ham_mlx.ops.c_helpers import host, load_helper, pointer, threads, wanted


def _load() -> ctypes.CDLL | None:
    return load_helper("_conv_cpu", None, "ham_short_conv")


def available() -> bool:
    """Whether `short_conv_c` can run here (see the module's docstring)."""
    return wanted("HAM_MLX_NO_C_CONV") and _load() is not None


def short_conv_c(x: mx.array, taps: mx.array, prev: mx.array | None) -> mx.array:
    """SiLU(Σ_i xp[:, t + i] * taps[i]) for xp = [prev; x] along the tokens: x [B, L, C]
    float32, taps [Kc, C] (tap Kc-1 multiplies the current token), prev [B, Kc-1, C] or None
    (zeros). Evaluates its inputs; returns [B, L, C] float32."""
    lib = _load()
    if lib is None:
        raise RuntimeError("the C conv helper is not loaded (see ham_mlx.ops.cpu_conv)")
    B, L, C = x.shape
    Kc = taps.shape[0]
    mx.eval(x, taps, *([] if prev is None else [prev]))
    xa = host(x, mx.float32)
    wa = np.ascontiguousarray(host(taps, mx.float32))
    pa = None if prev is None else np.ascontiguousarray(host(prev, mx.float32))
    out = np.empty((B, L, C), np.float32)
    f = ctypes.c_float
    rc = lib.ham_short_conv(
        *map(ctypes.c_int, (B, L, C, Kc)), pointer(xa, f),
        *(ctypes.c_long(s // 4) for s in xa.strides[:2]),
        None if pa is None else pointer(pa, f), pointer(wa, f), pointer(out, f),
        ctypes.c_int(threads("HAM_MLX_C_CONV_THREADS")),
    )  # fmt: skip
    if rc != 0:
        raise ValueError(f"the C conv helper takes 1 to 16 taps, not {Kc}")
    return mx.array(out)
