"""`gated_delta_chunked`'s forward as one C call on the CPU, for cached prefill.

MLX runs the chunked scan as batched products of 64-128 rows, each a separate multi-threaded
sgemm call, with the chunk's terms written to memory between them. The C helper
(`ham_mlx/_scan_cpu.c`, compiled by `pip install` where a C compiler exists) computes the same
arithmetic one (row, value head) at a time, its terms held in the CPU's cache, with the heads
shared among threads that each call single-threaded OpenBLAS sgemm and strsm.

`available()` is true on Linux when the helper was built and OpenBLAS was loaded (ham_mlx._blas),
and HAM_MLX_NO_C_SCAN is unset. Its twin is `ham_mlx.ops.gated_delta.gated_delta_chunked`
(tests/test_cpu_scan.py compares them). No gradient: this serves cached prefill only.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from ham_mlx.ops.c_helpers import host, load_helper, pointer, threads, wanted


def _load() -> ctypes.CDLL | None:
    return load_helper("_scan_cpu", "ham_scan_init", "ham_gated_delta")


def available() -> bool:
    """Whether `gated_delta_c` can run here (see the module's docstring)."""
    return wanted("HAM_MLX_NO_C_SCAN") and _load() is not None


class OutputNorm(NamedTuple):
    """The layer's gated RMSNorm of o (`gated_rms_norm`), which the helper applies to each o row
    as it writes it: o / sqrt(mean(o^2) + eps) * weight * act(gate)."""

    gate: mx.array | None  # [B, T, HV, Dv] the output gate's logits (None: no gate)
    weight: mx.array  # [Dv]
    eps: float
    activation: str  # "sigmoid", else SiLU


def gated_delta_c(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array | None = None,
    chunk_size: int = 64,
    with_v_hat: bool = True,
    out_norm: OutputNorm | None = None,
) -> tuple[mx.array, mx.array | None, mx.array]:
    """`gated_delta_chunked(q, k, v, g, beta, state, chunk_size)` in one C call: (o, v̂, state);
    v̂ None, and a quarter less work, without `with_v_hat` (a GDN layer reads o only). With
    `out_norm`, the first result is the gated RMSNorm of o instead (`OutputNorm`).

    q, k `[B, T, H, Dk]`; v `[B, T, HV, Dv]`; g, beta `[B, T, HV]`; state `[B, HV, Dv, Dk]` or
    None (zeros). Evaluates its inputs; returns float32 arrays.
    """
    lib = _load()
    if lib is None:
        raise RuntimeError("the C scan helper is not loaded (see ham_mlx.ops.cpu_scan)")
    B, T, H, Dk = k.shape
    HV, Dv = v.shape[2], v.shape[3]
    if HV % H:
        raise ValueError(f"value heads ({HV}) must be a multiple of q/k heads ({H})")
    norm = None if out_norm is None else _norm_args(out_norm, (B, T, HV, Dv))
    mx.eval(q, k, v, g, beta, *([] if state is None else [state]))
    qa, ka, va = (host(x, mx.float32) for x in (q, k, v))  # innermost axis contiguous
    ga, ba = (_heads_contiguous(host(x, mx.float32)) for x in (g, beta))
    sa = None if state is None else np.ascontiguousarray(host(state, mx.float32))
    strides = np.array(
        [st // 4 for a in (qa, ka, va) for st in a.strides[:3]]
        + [st // 4 for a in (ga, ba) for st in a.strides[:2]],
        dtype=np.int64,
    )
    out = np.empty((B, T, 2 if with_v_hat else 1, HV, Dv), np.float32)  # o (, then v̂)
    s = np.empty((B, HV, Dv, Dk), np.float32)
    f = ctypes.c_float
    rc = lib.ham_gated_delta(
        *map(ctypes.c_int, (B, T, H, HV, Dk, Dv, chunk_size)),
        *(pointer(a, f) for a in (qa, ka, va, ga, ba)),
        pointer(strides, ctypes.c_long), None if sa is None else pointer(sa, f),
        pointer(out, f), pointer(s, f), ctypes.c_int(int(with_v_hat)),
        *(norm if norm else (None, None, None, ctypes.c_float(0.0), ctypes.c_int(0))),
        ctypes.c_int(threads("HAM_MLX_C_SCAN_THREADS")),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("the C scan helper could not allocate its buffers")
    if not with_v_hat:
        return mx.array(out.reshape(B, T, HV, Dv)), None, mx.array(s)
    out = mx.array(out)
    return out[:, :, 0], out[:, :, 1], mx.array(s)


def _norm_args(norm: OutputNorm, shape: tuple[int, ...]) -> tuple:
    """The helper's output-norm arguments: gate, its strides (row, token, head), weight, eps,
    activation (the pointers keep their arrays alive)."""
    if norm.gate is not None and tuple(norm.gate.shape) != shape:
        raise ValueError(f"the output gate is {tuple(norm.gate.shape)}, the scan's o {shape}")
    if tuple(norm.weight.shape) != shape[-1:]:
        got = tuple(norm.weight.shape)
        raise ValueError(f"the output norm's weight is {got}, not ({shape[-1]},)")
    mx.eval(norm.weight, *([] if norm.gate is None else [norm.gate]))
    weight = pointer(np.ascontiguousarray(host(norm.weight, mx.float32)), ctypes.c_float)
    eps = ctypes.c_float(norm.eps)
    if norm.gate is None:
        return None, None, weight, eps, ctypes.c_int(0)
    gate = host(norm.gate, mx.float32)
    strides = np.array([st // 4 for st in gate.strides[:3]], dtype=np.int64)
    act = ctypes.c_int(2 if norm.activation == "sigmoid" else 1)
    return pointer(gate, ctypes.c_float), pointer(strides, ctypes.c_long), weight, eps, act


def _heads_contiguous(a: np.ndarray) -> np.ndarray:
    """a [B, T, HV] with its head axis contiguous (the C helper steps over rows and tokens)."""
    return a if a.strides[2] == a.itemsize else np.ascontiguousarray(a)
