"""`chunk_attention` as one C call on the CPU: tiles, so the logits never reach memory.

MLX computes `chunk_attention` op by op: the logits of a 1024-query chunk over 1600 keys are
40 MB per head group, written by one product, read and written by 2^x, read again by the next
product. The C helper (`ham_mlx/_attention_cpu.c`, compiled by `pip install` where a C compiler
exists) does the same arithmetic on 128 x 256 tiles that stay in the CPU's cache, with
OpenBLAS's sgemm for both products and a vectorised 2^x between them.

`available()` is true on Linux when the helper was built and OpenBLAS was loaded (ham_mlx._blas),
and HAM_MLX_NO_C_ATTENTION is unset. Its twin is `ham_mlx.ops.attention.chunk_attention`
(tests/test_cpu_attention.py compares them). No gradient: this serves cached prefill only.
"""

from __future__ import annotations

import ctypes

import mlx.core as mx
import numpy as np

from ham_mlx.ops import attention  # its terms (each module uses the other at call time only)
from ham_mlx.ops.c_helpers import host, load_helper, pointer, threads, wanted


def _load() -> ctypes.CDLL | None:
    return load_helper("_attention_cpu", "ham_attention_init", "ham_chunk_attention")


def available() -> bool:
    """Whether `chunk_attention_c` can run here (see the module's docstring)."""
    return wanted("HAM_MLX_NO_C_ATTENTION") and _load() is not None


def workers() -> int:
    """Threads for one call: HAM_MLX_C_ATTENTION_THREADS, else the CPUs this process may use."""
    return threads("HAM_MLX_C_ATTENTION_THREADS")


def chunk_attention_c(
    q: mx.array,
    keys: mx.array,
    values: mx.array,
    counts: mx.array,
    key_positions: mx.array,
    query_positions: mx.array,
    log_scale: mx.array,
    sink: mx.array,
    key_bias: mx.array | None = None,
    settled: int = 0,
    gated: tuple[mx.array, mx.array, float] | None = None,
) -> mx.array:
    """`chunk_attention` (same arguments and conditions, `fits_exp2` included) in one C call.

    q `[B, H, L, Dk]`; keys `[B, H, n, Dk]`; values `[B, HV, n, Dv]`. Evaluates its inputs.
    Returns `[B, HV, L, Dv]` in q's dtype (a transposed view of a `[B, L, HV, Dv]` array).
    gated: (gate `[B, L, HV]`, norm weight `[Dv]`, eps): return the HAM layer's gated output
    instead, `gated_output(chunk_attention(...), *gated)`, `[B, L, HV, Dv]` float32, the norm
    and the gate applied to each row in the same pass.
    """
    lib = _load()
    if lib is None:
        raise RuntimeError("the C attention helper is not loaded (see ham_mlx.ops.cpu_attention)")
    B, H, L, Dk = q.shape
    HV, n, Dv = values.shape[1], keys.shape[2], values.shape[3]
    log2e = attention.LOG2E
    s, m, sink_weight = attention.logit_bound(log_scale, sink)
    scale, shift = log2e * s, -log2e * m  # [HV]
    bias2 = None if key_bias is None else log2e * key_bias.astype(mx.float32)  # [B, n]
    q_pos = query_positions if query_positions.ndim == 2 else query_positions[None]
    q_pos = mx.broadcast_to(q_pos, (B, L))
    parts = [q, keys, values, scale, shift, sink_weight, counts, key_positions, q_pos]
    gate = weight = None
    if gated is not None:
        gate, weight = gated[0].astype(mx.float32), gated[1].astype(mx.float32)
        parts += [gate, weight]
    mx.eval(*parts, *([] if bias2 is None else [bias2]))

    qa, ka, va = (host(x, mx.float32) for x in (q, keys, values))
    params = [np.ascontiguousarray(host(x, mx.float32)) for x in (scale, shift, sink_weight)]
    ints = [np.ascontiguousarray(host(x, mx.int32)) for x in (counts, key_positions, q_pos)]
    ba = None if bias2 is None else np.ascontiguousarray(host(bias2, mx.float32))
    out = np.empty((B, L, HV, Dv), np.float32)
    f = ctypes.c_float
    gate_args: list = [None, ctypes.c_long(0), ctypes.c_long(0), None, ctypes.c_float(0.0)]
    if gated is not None:
        ga = host(gate, mx.float32)
        wa = np.ascontiguousarray(host(weight, mx.float32))
        gate_args = [pointer(ga, f), *(ctypes.c_long(st // 4) for st in ga.strides[:2]),
                     pointer(wa, f), ctypes.c_float(gated[2])]  # fmt: skip
    # row strides of a length-1 axis are arbitrary; BLAS wants a leading dimension >= the row
    strides = [
        st // 4 if (axis < 2 or a.shape[2] > 1) else a.shape[3]
        for a in (qa, ka, va)
        for axis, st in enumerate(a.strides[:3])
    ]
    rc = lib.ham_chunk_attention(
        ctypes.c_int(B), ctypes.c_int(H), ctypes.c_int(HV), ctypes.c_int(L), ctypes.c_int(n),
        ctypes.c_int(Dk), ctypes.c_int(Dv),
        pointer(qa, f), *map(ctypes.c_long, strides[0:3]),
        pointer(ka, f), *map(ctypes.c_long, strides[3:6]),
        pointer(va, f), *map(ctypes.c_long, strides[6:9]),
        *(pointer(p, f) for p in params),
        None if ba is None else pointer(ba, f),
        *(pointer(a, ctypes.c_int32) for a in ints),
        ctypes.c_int(settled), pointer(out, f), ctypes.c_int(workers()), *gate_args,
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("the C attention helper could not allocate its tiles")
    if gated is not None:
        return mx.array(out)
    return mx.array(out).transpose(0, 2, 1, 3).astype(q.dtype)
