"""The head routers' surprise (`ham_mlx.routers.head_surprise`) as one C call on the CPU, for
cached prefill.

MLX computes a head's cosine or l2 surprise as three reductions over [T, HV, Dv], each its own
pass (5-7 ms for 1024 tokens of the `base` preset here, contiguous or not, compiled or not). The
C helper (`ham_mlx/_surprise_cpu.c`, compiled by `pip install` where a C compiler exists) reads v
and v̂ once.

`available()` is true on Linux when the helper was built and OpenBLAS was loaded (the Linux CPU
path), and HAM_MLX_NO_C_SURPRISE is unset. Its twin is the MLX form of `head_surprise`
(tests/test_cpu_surprise.py compares them). No gradient: the score is never differentiated
(the router's is learned, and computed elsewhere).
"""

from __future__ import annotations

import ctypes

import mlx.core as mx
import numpy as np

from ham_mlx.ops.c_helpers import host, load_helper, pointer, threads, wanted

KINDS = {"cosine": 0, "l2": 1}


def _load() -> ctypes.CDLL | None:
    return load_helper("_surprise_cpu", None, "ham_head_surprise")


def available() -> bool:
    """Whether `head_surprise_c` can run here (see the module's docstring)."""
    return wanted("HAM_MLX_NO_C_SURPRISE") and _load() is not None


def head_surprise_c(v_hat: mx.array, v: mx.array, kind: str, eps: float) -> mx.array:
    """e [B, T, HV] float32 of v_hat and v [B, T, HV, Dv] for a head router kind ("cosine" or
    "l2"), as `head_surprise` computes it. Evaluates its inputs."""
    lib = _load()
    if lib is None:
        raise RuntimeError("the C surprise helper is not loaded (see ham_mlx.ops.cpu_surprise)")
    B, T, HV, Dv = v.shape
    mx.eval(v_hat, v)
    ha, va = host(v_hat, mx.float32), host(v, mx.float32)
    hs, vs = (np.array([s // 4 for s in a.strides[:3]], np.int64) for a in (ha, va))
    out = np.empty((B, T, HV), np.float32)
    f = ctypes.c_float
    lib.ham_head_surprise(
        *map(ctypes.c_int, (KINDS[kind], B, T, HV, Dv)),
        pointer(ha, f), pointer(hs, ctypes.c_long), pointer(va, f), pointer(vs, ctypes.c_long),
        ctypes.c_float(eps), pointer(out, f), ctypes.c_int(threads("HAM_MLX_C_SURPRISE_THREADS")),
    )  # fmt: skip
    return mx.array(out)
