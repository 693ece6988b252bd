"""Softmax attention over admitted tokens with a learned sink (spec §4.3).

Logit of query t and key s in head n: `exp(log_scale[n]) * (q_t · k_s)` (+ `key_bias[s]`). The sink
logit `sink[n]` joins the softmax denominator with a zero value, so a query with no allowed key
returns exactly 0. Layout `[B, N, T, D]`; N = HV (the caller repeats q/k heads for GVA).
"""

import mlx.core as mx
import numpy as np

from ham_mlx import kernels
from ham_mlx.kernels import attention as attention_kernel
from ham_mlx.ops import cpu_attention, fast_math

SPLIT_MIN = 128  # queries per causal block at least (smaller products cost more than they save)


def masked_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    mask: mx.array,
    log_scale: mx.array,
    sink: mx.array,
    key_bias: mx.array | None = None,
) -> mx.array:
    """Attention of q `[B, N, Tq, Dk]` over k `[B, N, Tk, Dk]`, v `[B, N, Tk, Dv]`.

    mask: bool, broadcastable to `[B, N, Tq, Tk]`, True = may attend. log_scale, sink: `[N]`.
    key_bias `[B, Tk]` (the learned router's log r_s) is added to the logits of key s.
    Returns `[B, N, Tq, Dv]` in q's dtype.
    """
    q = q * mx.exp(log_scale.astype(mx.float32)).astype(q.dtype)[:, None, None]
    if q.dtype == mx.float32 and fast_math.enabled():
        return softmax_attention(q, k, v, mask, sink, key_bias)
    if key_bias is not None:
        # Finite fill: a fully masked row then ties at a huge negative logit that the sink beats.
        fill = -0.5 * mx.finfo(q.dtype).max
        mask = mx.where(mask, key_bias[:, None, None, :].astype(q.dtype), fill).astype(q.dtype)
    return mx.fast.scaled_dot_product_attention(
        q, k, v, scale=1.0, mask=mask, sinks=sink.astype(q.dtype)
    )


def softmax_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    mask: mx.array,
    sink: mx.array,
    key_bias: mx.array | None = None,
) -> mx.array:
    """`masked_attention` with q already scaled, the softmax written out with `fast_math.exp`
    (the CPU form, float32; its twin is `mx.fast.scaled_dot_product_attention`). A query with no
    allowed key has only -inf logits: m is the sink, p is 0 and the output exactly 0."""
    logits = q @ k.swapaxes(-1, -2)  # [B, N, Tq, Tk]
    if key_bias is not None:
        logits = logits + key_bias[:, None, None, :].astype(logits.dtype)
    logits = mx.where(mask, logits, -mx.inf)
    return sink_softmax_values(logits, sink.astype(logits.dtype)[:, None, None], v)


def sink_softmax_values(logits: mx.array, sink: mx.array, v: mx.array) -> mx.array:
    """softmax(logits) @ v with the sink logit in the denominator (its value is 0), the exp from
    `fast_math`. logits `[..., Tq, Tk]` (-inf where masked), sink broadcastable to
    `[..., Tq, 1]`, v `[..., Tk, Dv]`. A row of -inf logits gives exactly 0."""
    m = mx.stop_gradient(mx.maximum(mx.max(logits, axis=-1, keepdims=True), sink))
    p = fast_math.exp(logits - m)
    denom = mx.sum(p, axis=-1, keepdims=True) + fast_math.exp(sink - m)
    return (p @ v) / denom


def admitted_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    admitted: mx.array,
    log_scale: mx.array,
    sink: mx.array,
    key_bias: mx.array | None = None,
    offset: int = 0,
    split: bool | None = None,
) -> mx.array:
    """Causal attention over admitted keys (prefill and training).

    q `[B, N, Tq, Dk]`; k `[B, N, Tk, Dk]`, v `[B, N, Tk, Dv]` with Tk = offset + Tq (the last Tq
    keys are the queries' own tokens); admitted bool `[B, Tk]`. Query i (position offset + i)
    may attend key s iff s <= offset + i and admitted[b, s]. Returns `[B, N, Tq, Dv]`.
    split: compute by causal blocks, halving the queries while halves keep SPLIT_MIN (None: with
    the CPU fast path, `fast_math.enabled()`, for float32).
    """
    Tq, Tk = q.shape[2], k.shape[2]
    if split is None:
        split = q.dtype == mx.float32 and fast_math.enabled()
    if split and Tq >= 2 * SPLIT_MIN and Tq % 2 == 0:
        # The first half of the queries sees only the keys up to its last position: a quarter
        # of the logits is skipped here, nearly half over the recursion (twin: split=False).
        h, seen = Tq // 2, offset + Tq // 2
        bias_top = None if key_bias is None else key_bias[:, :seen]
        top = admitted_attention(q[:, :, :h], k[:, :, :seen], v[:, :, :seen], admitted[:, :seen],
                                 log_scale, sink, bias_top, offset, split)  # fmt: skip
        bottom = admitted_attention(q[:, :, h:], k, v, admitted, log_scale, sink, key_bias,
                                    offset + h, split)  # fmt: skip
        return mx.concatenate([top, bottom], axis=2)
    causal = mx.arange(Tk)[None, :] <= (offset + mx.arange(Tq))[:, None]  # [Tq, Tk]
    mask = causal & admitted[:, None, None, :]  # [B, 1, Tq, Tk]
    return masked_attention(q, k, v, mask, log_scale, sink, key_bias)


def cache_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    counts: mx.array,
    log_scale: mx.array,
    sink: mx.array,
) -> mx.array:
    """Decode over a compact cache: k `[B, N, C, Dk]`, v `[B, N, C, Dv]`, counts `[B]`.

    Slot j of row b is valid iff j < counts[b]; every query in q `[B, N, Tq, Dk]` sees all valid
    slots. Returns `[B, N, Tq, Dv]`.
    """
    valid = mx.arange(k.shape[2])[None, :] < counts[:, None]  # [B, C]
    return masked_attention(q, k, v, valid[:, None, None, :], log_scale, sink)


def compact_attention(
    q: mx.array,
    keys: mx.array,
    values: mx.array,
    counts: mx.array,
    key_positions: mx.array,
    query_positions: mx.array,
    log_scale: mx.array,
    sink: mx.array,
    key_bias: mx.array | None = None,
) -> mx.array:
    """Attention over a compact cache of admitted tokens (decode and cached prefill).

    q `[B, H, L, Dk]`; keys `[B, H, n, Dk]`; values `[B, HV, n, Dv]`; counts `[B]`; key_positions
    `[B, n]`; query_positions `[L]` or per row `[B, L]`. Query i attends slot j iff
    j < counts[b] and key_positions[b, j] <= query_positions[(b,) i]. Value head j reads q/k
    head j // (HV // H).
    Returns `[B, HV, L, Dv]`. This is the plain-ops twin of the admitted-attention kernel.
    """
    q, keys = _repeat_for_value_heads(q, keys, values.shape[1])
    mask = _slot_mask(counts, key_positions, query_positions, 0, keys.shape[2])[:, None]
    return masked_attention(q, keys, values, mask, log_scale, sink, key_bias)  # mask [B,1,L,n]


def _repeat_for_value_heads(q: mx.array, keys: mx.array, HV: int) -> tuple[mx.array, mx.array]:
    """q `[B, H, L, Dk]`, keys `[B, H, n, Dk]` repeated so that value head j reads q/k head
    j // (HV // H)."""
    H = q.shape[1]
    if HV == H:
        return q, keys
    return mx.repeat(q, HV // H, axis=1), mx.repeat(keys, HV // H, axis=1)


def _slot_mask(counts, key_positions, query_positions, start: int, end: int) -> mx.array:
    """`[B, L, end - start]`: query i sees slot j of row b iff j < counts[b] and
    key_positions[b, j] <= query_positions[(b,) i]."""
    q_pos = query_positions if query_positions.ndim == 2 else query_positions[None]  # [B|1, L]
    filled = mx.arange(start, end)[None, :] < counts[:, None]  # [B, end - start]
    return filled[:, None, :] & (key_positions[:, None, start:end] <= q_pos[:, :, None])


LOG2E = 1.4426950408889634
EXPONENT_RANGE = 80.0  # natural-log units; exp(-80) is still a normal float32


def fits_exp2(log_scale: mx.array, sink: mx.array, key_bias: bool) -> bool:
    """Whether `chunk_attention` may stabilise the softmax with the bound of the logits instead
    of their maximum: every unmasked logit and the sink then lie within EXPONENT_RANGE of it.
    Reads two parameter arrays on the host."""
    s = mx.exp(log_scale.astype(mx.float32))
    sink = sink.astype(mx.float32)
    low = mx.minimum(-s - (14.0 if key_bias else 0.0), sink)  # log(max(r, 1e-6)) >= -13.9
    return float(mx.max(mx.maximum(s, sink) - low).item()) <= EXPONENT_RANGE


def logit_bound(log_scale: mx.array, sink: mx.array) -> tuple[mx.array, ...]:
    """The terms `chunk_attention` (and its C form) build on, float32 `[HV]`: the scale
    s = exp(log_scale), the bound m = max(s, sink) of the logits and the sink's weight
    exp(sink - m)."""
    s = mx.exp(log_scale.astype(mx.float32))
    m = mx.maximum(s, sink.astype(mx.float32))
    return s, m, mx.exp(sink.astype(mx.float32) - m)


def chunk_attention(
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
) -> mx.array:
    """`compact_attention` for many queries at once (cached prefill on the CPU), same arguments
    and result; settled: slots [0, settled) hold, in every row, entries stored before this call
    (positions before every query), so only the later slots need a mask.

    q̂ and k̂ have unit norm and the router bias is <= 0, so no logit of head j exceeds
    m_j = max(s_j, sink_j) with s_j = exp(log_scale_j). One product gives the logits in base 2,
    already shifted by -m_j: q'_t = [c s_j q̂_t, 1], k'_s = [k̂_s, c (bias_s - m_j)], c = log2 e,
    and the sink's weight 2^(c (sink_j - m_j)) with a zero value. Then p = 2^logit (no max pass;
    2^x is cheaper than e^x on the CPU), o = (p @ v) / (Σ p + sink weight), with Σ p from the
    same product (a ones column beside v). Settled slots and later ones are two products, so only
    the later ones pass through a mask. Masked logits are -inf, so a query with no admitted key
    gets exactly 0. Needs `fits_exp2`. Returns `[B, HV, L, Dv]`.
    """
    B, _, L, Dk = q.shape
    HV, n, Dv = values.shape[1], keys.shape[2], values.shape[3]
    q, keys = _repeat_for_value_heads(q, keys, HV)
    f32 = mx.float32
    s, m, sink_weight = logit_bound(log_scale, sink)  # [HV]
    qx = mx.concatenate([q.astype(f32) * (LOG2E * s)[:, None, None], mx.ones((B, HV, L, 1), f32)],
                        axis=-1)  # [B, HV, L, Dk+1]  # fmt: skip
    shift = mx.broadcast_to((-LOG2E * m)[None, :, None, None], (B, HV, n, 1))
    if key_bias is not None:
        shift = shift + LOG2E * key_bias.astype(f32)[:, None, :, None]
    kx = mx.concatenate([keys.astype(f32), shift], axis=-1)  # [B, HV, n, Dk+1]
    # a ones column: the product with p gives the row sums too
    vx = mx.concatenate([values.astype(f32), mx.ones((B, HV, n, 1), f32)], axis=-1)
    acc = None  # [B, HV, L, Dv+1]: Σ p v | Σ p
    if settled > 0:  # every query sees these: no mask
        p = fast_math.exp2(qx @ kx[:, :, :settled].swapaxes(-1, -2))  # [B, HV, L, settled]
        acc = p @ vx[:, :, :settled]
    if settled < n:
        late = _slot_mask(counts, key_positions, query_positions, settled, n)  # [B, L, n-settled]
        logits = qx @ kx[:, :, settled:].swapaxes(-1, -2)  # [B, HV, L, n-settled]
        p = fast_math.exp2(mx.where(late[:, None], logits, -mx.inf))
        acc = p @ vx[:, :, settled:] if acc is None else acc + p @ vx[:, :, settled:]
    if acc is None:  # no key at all
        return mx.zeros((B, HV, L, Dv), q.dtype)
    sink_p = sink_weight[None, :, None, None]  # the sink's value is 0
    return (acc[..., :Dv] / (acc[..., Dv:] + sink_p)).astype(q.dtype)


def buffer_attention(
    q: mx.array,
    keys: mx.array,
    values: mx.array,
    counts: mx.array,
    log_scale: mx.array,
    sink: mx.array,
    key_bias: mx.array | None = None,
) -> mx.array:
    """One query per row over a whole compact buffer (the fixed-shape decode path).

    q `[B, H, Dk]`; keys `[B, H, n, Dk]`; values `[B, HV, n, Dv]`; counts `[B]`: slot j of row b
    is valid iff j < counts[b] (one decoded token comes after every stored one); key_bias `[B, n]`.
    Same result as `compact_attention` with L = 1 and every stored position <= the query's, but
    GVA without repeating the keys, and a softmax written out with the sink. Returns
    `[B, HV, Dv]` in q's dtype.
    """
    H, HV = q.shape[1], values.shape[1]
    n = keys.shape[2]
    logits = (keys @ q[..., None])[..., 0]  # [B, H, n]
    if HV != H:
        logits = mx.repeat(logits, HV // H, axis=1)  # [B, HV, n]
    logits = logits * mx.exp(log_scale.astype(mx.float32)).astype(q.dtype)[:, None]
    if key_bias is not None:
        logits = logits + key_bias[:, None, :].astype(q.dtype)
    valid = (mx.arange(n)[None, :] < counts[:, None])[:, None, :]  # [B, 1, n]
    logits = mx.where(valid, logits, -mx.inf)[:, :, None, :]  # [B, HV, 1, n]
    o = sink_softmax_values(logits, sink.astype(q.dtype)[:, None, None], values)
    return o[:, :, 0, :]  # [B, HV, Dv]


def gated_output(o: mx.array, gate: mx.array, weight: mx.array, eps: float) -> mx.array:
    """sigmoid(gate) * RMSNorm(o) * weight (spec §4.4), float32.

    o `[B, HV, L, Dv]`; gate `[B, L, HV]` (the kv_gate_proj logits); weight `[Dv]`.
    Returns `[B, L, HV, Dv]`.
    """
    o = o.transpose(0, 2, 1, 3).astype(mx.float32)
    o = mx.fast.rms_norm(o, weight.astype(mx.float32), eps)
    return fast_math.sigmoid(gate.astype(mx.float32))[..., None] * o


def cached_admitted_attention(
    q: mx.array,
    keys: mx.array,
    values: mx.array,
    counts: mx.array,
    key_positions: mx.array,
    query_positions: mx.array,
    log_scale: mx.array,
    sink: mx.array,
    key_bias: mx.array | None,
    gate: mx.array,
    norm_weight: mx.array,
    eps: float,
    settled: int | None = None,
) -> mx.array:
    """`gated_output(compact_attention(...))`: the HAM attention term over the cache,
    `[B, L, HV, Dv]`. On a GPU a fused kernel computes it (see ham_mlx.kernels); with
    `settled` (see `chunk_attention`) and more than one query, `chunk_attention` does, or its
    C twin `cpu_attention.chunk_attention_c` where that is available (with the gated norm in the
    same pass)."""
    if kernels.kernels_enabled():
        if query_positions.ndim != 1:
            kernels.warn_fallback("admitted-attention", "rows at different positions")
        elif attention_kernel.supported(q, values):
            args = (q, keys, values, counts, key_positions, query_positions, log_scale, sink)
            return _attention_gpu(*args, key_bias, gate, norm_weight, eps)
        else:
            kernels.warn_fallback("admitted-attention", "head sizes are not multiples of 32")
    args = (q, keys, values, counts, key_positions, query_positions, log_scale, sink, key_bias)
    if settled is not None and q.shape[2] > 1 and fits_exp2(log_scale, sink, key_bias is not None):
        if cpu_attention.available():  # the norm and the gate in the same pass
            return cpu_attention.chunk_attention_c(*args, settled, (gate, norm_weight, eps))
        o = chunk_attention(*args, settled)
    else:
        o = compact_attention(*args)
    return gated_output(o, gate, norm_weight, eps)


def _attention_gpu(q, keys, values, counts, key_pos, query_pos, log_scale, sink, key_bias, gate,
                   norm_weight, eps):  # fmt: skip
    kernel = (
        attention_kernel.CUDA_KERNEL if kernels.BACKEND == "cuda" else attention_kernel.METAL_KERNEL
    )
    return attention_kernel.call(
        kernel, q, keys, values, counts, key_pos, query_pos, log_scale, sink, key_bias, gate,
        norm_weight, eps,
    )  # fmt: skip


def attention_reference(q, k, v, mask, log_scale, sink, key_bias=None) -> np.ndarray:
    """Slow float64 twin of `masked_attention`: loops over batch, head and query, gathers the
    allowed keys and appends the sink logit with a zero value. Returns numpy `[B, N, Tq, Dv]`."""

    def f64(x):
        return np.array(x.astype(mx.float32) if isinstance(x, mx.array) else x, dtype=np.float64)

    q, k, v, log_scale, sink = (f64(x) for x in (q, k, v, log_scale, sink))
    B, N, Tq, _ = q.shape
    Tk, Dv = k.shape[2], v.shape[3]
    mask = np.broadcast_to(np.array(mask, dtype=bool), (B, N, Tq, Tk))
    bias = np.zeros((B, Tk)) if key_bias is None else f64(key_bias)
    out = np.zeros((B, N, Tq, Dv))
    for b in range(B):
        for n in range(N):
            for i in range(Tq):
                keys = np.flatnonzero(mask[b, n, i])
                logits = np.exp(log_scale[n]) * (k[b, n, keys] @ q[b, n, i]) + bias[b, keys]
                logits = np.append(logits, sink[n])
                p = np.exp(logits - logits.max())
                p /= p.sum()
                out[b, n, i] = p[:-1] @ v[b, n, keys]  # the sink's value is zero
    return out
