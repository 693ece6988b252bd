"""The gated delta rule that also returns the RNN's prediction v̂ (spec §3 step 7, §6).

Per step and value head, in this order:

    S   <- alpha_t * S                       # alpha_t = exp(g_t)
    v̂_t = S k_t                              # prediction: after the decay, before the write
    S   <- S + beta_t (v_t - v̂_t) k_tᵀ
    o_t = S q_t                              # read after the write

Shapes: q, k `[B, T, H, Dk]` (q l2-normalised and scaled by Dk**-0.5, k l2-normalised), v
`[B, T, HV, Dv]`, g (log decay, <= 0) and beta `[B, T, HV]`, state `[B, HV, Dv, Dk]` (V-first).
GVA: value head j reads q/k head j // (HV // H). All arithmetic is float32.
"""

import contextlib
import contextvars
import os
from collections.abc import Iterator
from functools import partial

import mlx.core as mx

from ham_mlx import kernels
from ham_mlx.kernels import scan as scan_kernel
from ham_mlx.ops import cpu_scan

SEQUENTIAL_MAX_T = 8  # measured crossover on Linux CPU (B=1..8, HV=4..16, Dk=64, Dv=128)


def autodiff_requested() -> bool:
    """HAM_MLX_AUTODIFF_SCAN=1: the chunked scan's gradient by MLX's autodiff of its forward (the
    twin of the written-out gradient; read when a function is traced)."""
    return os.environ.get("HAM_MLX_AUTODIFF_SCAN", "") not in ("", "0")


_saving: contextvars.ContextVar[bool] = contextvars.ContextVar("saving", default=False)


@contextlib.contextmanager
def saving_for_gradient() -> Iterator[None]:
    """Inside the block (a training step's loss, as it is traced), the chunked scan keeps its
    forward's intermediate terms for its gradient instead of computing them again: less work
    for the backward pass, more memory alive until it runs. Outside, a forward pass keeps
    nothing it does not return."""
    token = _saving.set(True)
    try:
        yield
    finally:
        _saving.reset(token)


def _prepare(q, k, v, g, beta, state):
    """Cast to fp32, repeat q/k heads to HV and make a zero state if needed."""
    B, T, H, Dk = k.shape
    HV, Dv = v.shape[2], v.shape[3]
    if HV % H:
        raise ValueError(f"value heads ({HV}) must be a multiple of q/k heads ({H})")
    q, k, v, g, beta = (x.astype(mx.float32) for x in (q, k, v, g, beta))
    if HV != H:
        q = mx.repeat(q, HV // H, axis=2)  # repeat-interleave: value head j reads j // (HV // H)
        k = mx.repeat(k, HV // H, axis=2)
    if state is None:
        state = mx.zeros((B, HV, Dv, Dk), dtype=mx.float32)
    return q, k, v, g, beta, state.astype(mx.float32)


def gated_delta_sequential(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array | None = None,
) -> tuple[mx.array, mx.array, mx.array]:
    """Step-by-step reference (and decode path). Returns o, v̂ `[B, T, HV, Dv]` and the state."""
    q, k, v, g, beta, S = _prepare(q, k, v, g, beta, state)
    qc, kc, kr = q[..., None], k[..., None], k[..., None, :]  # [B, T, HV, Dk, 1], [.., 1, Dk]
    v = v[..., None]  # [B, T, HV, Dv, 1]
    alpha = mx.exp(g)[..., None, None]  # [B, T, HV, 1, 1]
    beta = beta[..., None, None]
    outs, preds = [], []
    for t in range(v.shape[1]):
        S = alpha[:, t] * S  # [B, HV, Dv, Dk]
        v_hat = S @ kc[:, t]  # [B, HV, Dv, 1]
        S = S + (beta[:, t] * (v[:, t] - v_hat)) * kr[:, t]
        outs.append(S @ qc[:, t])
        preds.append(v_hat)
    o = mx.stack(outs, axis=1)[..., 0]  # [B, T, HV, Dv]
    v_hat = mx.stack(preds, axis=1)[..., 0]
    return o, v_hat, S


def gated_delta_step(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array,
) -> tuple[mx.array, mx.array, mx.array]:
    """One step (T = 1) of `gated_delta_sequential` with two passes over the state, not six.

    q, k `[B, HV, Dk]` (GVA heads already repeated), v `[B, HV, Dv]`, g, beta `[B, HV]`, state
    `[B, HV, Dv, Dk]` float32. With P = S [k, q] (one read of S):
        v̂ = α (S k),   u = β (v − v̂),   S' = α S + u kᵀ (one fused pass),   o = α (S q) + u (k · q)
    Returns o, v̂ `[B, HV, Dv]` and S'.
    """
    alpha = mx.exp(g)[..., None]  # [B, HV, 1]
    P = state @ mx.stack([k, q], axis=-1)  # [B, HV, Dv, 2]
    v_hat = alpha * P[..., 0]
    u = beta[..., None] * (v - v_hat)  # [B, HV, Dv]
    state = alpha[..., None] * state + u[..., None] * k[..., None, :]
    o = alpha * P[..., 1] + u * mx.sum(k * q, axis=-1, keepdims=True)
    return o, v_hat, state


def _unit_lower_inverse(L: mx.array, block: int = 16) -> mx.array:
    """(I + L)^-1 for strictly lower-triangular L `[..., n, n]`.

    Forward substitution on diagonal blocks of <= `block` rows, merged by halves:
    [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]].
    """
    n = L.shape[-1]
    if n <= block or n % 2:
        # Column by column: once rows <= j of X are final, subtract L[:, j] X[j] from those below.
        X = mx.broadcast_to(mx.eye(n, dtype=L.dtype), L.shape)
        for j in range(n - 1):
            X = X - L[..., :, j : j + 1] * X[..., j : j + 1, :]
        return X
    h = n // 2
    A_inv, D_inv = _unit_lower_inverse(mx.stack([L[..., :h, :h], L[..., h:, h:]]), block)
    C = -(D_inv @ (L[..., h:, :h] @ A_inv))
    top = mx.concatenate([A_inv, mx.zeros_like(A_inv)], axis=-1)
    return mx.concatenate([top, mx.concatenate([C, D_inv], axis=-1)], axis=-2)


@mx.custom_function
def unit_lower_inverse(L: mx.array) -> mx.array:
    """`_unit_lower_inverse` with its gradient written out: for X = (I + L)^-1,
    dX = -X dL X, so the cotangent of L is -Xᵀ X̄ Xᵀ, kept strictly lower (L's only entries)."""
    return _unit_lower_inverse(L)


@unit_lower_inverse.vjp
def _unit_lower_inverse_vjp(primals, cotangent, output):
    Xt = output.swapaxes(-1, -2)
    n = output.shape[-1]
    return (-(Xt @ cotangent @ Xt) * mx.tri(n, k=-1, dtype=output.dtype),)


def gated_delta_chunked(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array | None = None,
    chunk_size: int = 64,
    autodiff: bool | None = None,
) -> tuple[mx.array, mx.array, mx.array]:
    """Chunked (WY/UT) form: same result as `gated_delta_sequential`, differentiable.

    Per chunk of C steps with start state S0, writing D[t, s] = exp(G_t - G_s) (G = cumsum(g)
    inside the chunk), gamma_t = exp(G_t) and u_s = beta_s (v_s - v̂_s):
        A[t, s]  = D[t, s] (k_s · k_t) for s < t;   Aq[t, s] = D[t, s] (k_s · q_t) for s <= t
        [W | U]  = (I + beta A)^-1 (beta [gamma k | v]),   u = U - W S0ᵀ
        [o; v̂]   = [gamma q; gamma k] S0ᵀ + [Aq; A] u
        S_endᵀ   = gamma_C S0ᵀ + Σ_s D[C, s] k_s u_sᵀ
    A, Aq, W and U are computed for all chunks at once; the carry through the chunks reads each
    S0 for four [.., C or 2C, Dk or C] products whose operands stay in cache, instead of
    materialising the per-chunk [Dk, Dk] and [2C, Dk] transition matrices.

    The gradient is written out (`_chunks_vjp`, the carry run backwards, then all chunks at once);
    autodiff=True lets MLX differentiate the forward instead (its twin; None: `autodiff_requested`).
    """
    q, k, v, g, beta, S = _prepare(q, k, v, g, beta, state)
    B, T, HV, Dk = k.shape
    C = chunk_size
    NC = -(-T // C)
    pad = NC * C - T
    if pad:  # k = v = q = 0, beta = g = 0: these steps leave the state unchanged
        q, k, v, g, beta = (
            mx.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in (q, k, v, g, beta)
        )

    def chunks(x):  # [B, NC*C, HV, ...] -> [NC, B, HV, C, ...]
        x = x.reshape(B, NC, C, HV, *x.shape[3:])
        return x.transpose(1, 0, 3, 2, *range(4, x.ndim))

    qk = mx.concatenate([chunks(q), chunks(k)], axis=-2)  # [NC, B, HV, 2C, Dk]: [q; k]
    v = mx.contiguous(chunks(v))  # [NC, B, HV, C, Dv]
    g, beta = chunks(g)[..., None], chunks(beta)[..., None]  # [NC, B, HV, C, 1]
    autodiff = autodiff_requested() if autodiff is None else autodiff
    if autodiff:
        core = partial(_chunks_forward, autodiff=True)
    else:
        core = _chunks_saving if _saving.get() else _chunks
    out, S_end = core(qk, v, g, beta, S.swapaxes(-1, -2))[:2]  # out: [NC, B, HV, 2C, Dv]

    def steps(x):  # [NC, B, HV, C, Dv] -> [B, T, HV, Dv]
        return x.transpose(1, 0, 3, 2, 4).reshape(B, NC * C, HV, -1)[:, :T]

    return steps(out[..., :C, :]), steps(out[..., C:, :]), S_end.swapaxes(-1, -2)


def _chunk_terms(qk, v, g, beta, autodiff: bool = False):
    """Everything the carry needs, for all chunks at once: D, gamma, [Aq; A], (I + beta A)^-1,
    [gamma q; gamma k], W, U, D[C, s] k_sᵀ and gamma_C (shapes in `_chunks_forward`)."""
    C = v.shape[-2]
    k = qk[..., C:, :]  # [NC, B, HV, C, Dk]
    # D[t, s] = prod_{s < r <= t} alpha_r by cumprod: no overflow, and mx.exp is slow on CPU.
    alpha = mx.exp(g)
    strict = mx.tri(C, k=-1)  # s < t
    D = mx.cumprod(mx.where(strict.astype(mx.bool_), alpha, 1.0), axis=-2) * mx.tri(C)
    gamma = mx.cumprod(alpha, axis=-2)  # [NC, B, HV, C, 1]
    AA = mx.concatenate([D, D * strict], axis=-2) * (qk @ k.swapaxes(-1, -2))  # [Aq; A]
    inverse = _unit_lower_inverse if autodiff else unit_lower_inverse
    Tinv = inverse(beta * AA[..., C:, :])  # [NC, B, HV, C, C]
    gqk = mx.concatenate([gamma, gamma], axis=-2) * qk  # [gamma q; gamma k]: [NC, B, HV, 2C, Dk]
    W = Tinv @ (beta * gqk[..., C:, :])  # [NC, B, HV, C, Dk]
    U = Tinv @ (beta * v)  # [NC, B, HV, C, Dv]
    dkt = (D[..., -1, :, None] * k).swapaxes(-1, -2)  # D[C, s] k_s: [NC, B, HV, Dk, C]
    return D, gamma, AA, Tinv, gqk, W, U, dkt, gamma[..., -1:, :]


def _chunks_forward(qk, v, g, beta, St, autodiff: bool = False):
    """The chunked scan on chunked inputs: qk [NC, B, HV, 2C, Dk] ([q; k] per chunk), v
    [NC, B, HV, C, Dv], g, beta [NC, B, HV, C, 1], St [B, HV, Dk, Dv] (the state transposed).
    Returns out [NC, B, HV, 2C, Dv] ([o; v̂] per chunk) and the last state transposed."""
    terms = _chunk_terms(qk, v, g, beta, autodiff)
    out, St, _, _ = _carry(terms, St, keep=False)
    return out, St


def _carry(terms, St, keep: bool):
    """Run the state through the chunks; keep: also return each chunk's start state and u
    [NC, B, HV, Dk | C, Dv] (what the gradient reads)."""
    _, _, AA, _, gqk, W, U, dkt, gamma_end = terms
    out, starts, us = [], [], []
    for c in range(AA.shape[0]):
        u = mx.addmm(U[c], W[c], St, alpha=-1.0)  # U - W S0ᵀ: [B, HV, C, Dv]
        out.append(mx.addmm(AA[c] @ u, gqk[c], St))  # [B, HV, 2C, Dv]: [o; v̂]
        if keep:
            starts.append(St)
            us.append(u)
        St = gamma_end[c] * St + dkt[c] @ u
    if not keep:
        return mx.stack(out), St, None, None
    return mx.stack(out), St, mx.stack(starts), mx.stack(us)


@mx.custom_function
def _chunks(qk, v, g, beta, St):
    return _chunks_forward(qk, v, g, beta, St)


@_chunks.vjp
def _chunks_vjp(primals, cotangents, outputs):
    """The gradient of `_chunks_forward`, the forward's terms recomputed (it keeps nothing)."""
    terms = _chunk_terms(*primals[:4])
    _, _, starts, us = _carry(terms, primals[4], keep=True)
    return _chunks_backward(primals, cotangents, terms, starts, us)


@mx.custom_function
def _chunks_saving(qk, v, g, beta, St):
    """`_chunks` that also returns the terms and the carry's start states and u, so that its
    gradient reads them instead of computing them again (training: `saving_for_gradient`)."""
    terms = _chunk_terms(qk, v, g, beta)
    out, S_end, starts, us = _carry(terms, St, keep=True)
    return (out, S_end, *terms, starts, us)


@_chunks_saving.vjp
def _chunks_saving_vjp(primals, cotangents, outputs):
    return _chunks_backward(primals, cotangents, outputs[2:-2], outputs[-2], outputs[-1])


def _chunks_backward(primals, cotangents, terms, starts, us):
    """The gradient of `_chunks_forward` (see gated_delta_chunked's equations) from the
    forward's terms, start states [NC, B, HV, Dk, Dv] and u [NC, B, HV, C, Dv]. The carry runs
    backwards with two products per chunk; everything else is batched over the chunks."""
    qk, v, g, beta, St0 = primals
    d_out, d_end = cotangents[0], cotangents[1]
    C = v.shape[-2]
    D, gamma, AA, Tinv, gqk, W, U, dkt, gamma_end = terms
    T = lambda x: x.swapaxes(-1, -2)  # noqa: E731

    # The carry, backwards: dS is the cotangent of the state after chunk c.
    du_out = T(AA) @ d_out  # [NC, B, HV, C, Dv]: the part of du that is not carried
    dS_out = T(gqk) @ d_out  # [NC, B, HV, Dk, Dv]
    dS = mx.zeros_like(St0) if d_end is None else d_end
    du_list, dS_list = [], []
    for c in reversed(range(qk.shape[0])):
        du = du_out[c] + T(dkt[c]) @ dS  # [B, HV, C, Dv]
        dS_list.append(dS)
        du_list.append(du)
        dS = gamma_end[c] * dS + dS_out[c] - T(W[c]) @ du
    dS0 = dS
    du = mx.stack(du_list[::-1])  # [NC, B, HV, C, Dv]
    dS_after = mx.stack(dS_list[::-1])  # [NC, B, HV, Dk, Dv]

    d_gqk = d_out @ T(starts)  # [NC, B, HV, 2C, Dk]
    d_AA = d_out @ T(us)  # [NC, B, HV, 2C, C]
    d_dkt = dS_after @ T(us)  # [NC, B, HV, Dk, C]
    d_gamma_end = mx.sum(dS_after * starts, axis=(-2, -1))[..., None, None]  # [NC, B, HV, 1, 1]
    dW = -(du @ T(starts))  # [NC, B, HV, C, Dk]
    dU = du

    # W = Tinv (beta gamma k), U = Tinv (beta v), Tinv = (I + beta A)^-1.
    kg = gqk[..., C:, :]
    dBk, dBv = T(Tinv) @ dW, T(Tinv) @ dU
    d_beta = mx.sum(dBk * kg, axis=-1, keepdims=True) + mx.sum(dBv * v, axis=-1, keepdims=True)
    dv = beta * dBv
    d_gqk = mx.concatenate([d_gqk[..., :C, :], d_gqk[..., C:, :] + beta * dBk], axis=-2)
    dT = dW @ T(beta * kg) + dU @ T(beta * v)  # [NC, B, HV, C, C]
    strict = mx.tri(C, k=-1)
    dM = -(T(Tinv) @ dT @ T(Tinv)) * strict  # cotangent of beta A (strictly lower)
    A = AA[..., C:, :]
    d_beta = d_beta + mx.sum(dM * A, axis=-1, keepdims=True)
    d_AA = d_AA * mx.concatenate([mx.tri(C), strict], axis=-2)
    d_AA = mx.concatenate([d_AA[..., :C, :], d_AA[..., C:, :] + beta * dM], axis=-2)

    # [Aq; A] = [D; D strict] * (qk kᵀ);  gqk = [gamma; gamma] * qk;  dkt = (D[C, :] k)ᵀ.
    k = qk[..., C:, :]
    Dcat = mx.concatenate([D, D * strict], axis=-2)  # [NC, B, HV, 2C, C]
    P = qk @ T(k)
    dP = d_AA * Dcat
    gamma2 = mx.concatenate([gamma, gamma], axis=-2)
    d_qk = dP @ k + gamma2 * d_gqk  # [NC, B, HV, 2C, Dk]
    d_k = T(dP) @ qk + D[..., -1, :, None] * T(d_dkt)  # [NC, B, HV, C, Dk]
    d_qk = mx.concatenate([d_qk[..., :C, :], d_qk[..., C:, :] + d_k], axis=-2)
    dD = (d_AA[..., :C, :] * P[..., :C, :] + d_AA[..., C:, :] * P[..., C:, :]) * strict
    last_row = mx.sum(T(d_dkt) * k, axis=-1)[..., None, :]  # [NC, B, HV, 1, C]: d D[C, s]
    dD = mx.concatenate([dD[..., :-1, :], dD[..., -1:, :] + last_row * strict[-1:]], axis=-2)
    d_gamma = mx.sum(d_gqk * qk, axis=-1, keepdims=True)  # [NC, B, HV, 2C, 1]
    d_gamma = d_gamma[..., :C, :] + d_gamma[..., C:, :]
    d_gamma = mx.concatenate([d_gamma[..., :-1, :], d_gamma[..., -1:, :] + d_gamma_end], axis=-2)

    # D[t, s] = exp(G_t - G_s), gamma_t = exp(G_t), G = cumsum(g): dG, then dg = reverse cumsum.
    E = dD * D
    dG = d_gamma * gamma + mx.sum(E, axis=-1, keepdims=True) - T(mx.sum(E, axis=-2, keepdims=True))
    dg = mx.cumsum(dG, axis=-2, reverse=True)
    return d_qk, dv, dg, d_beta, dS0


def gated_delta(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array | None = None,
    cached: bool = False,
    with_v_hat: bool = True,
) -> tuple[mx.array, mx.array | None, mx.array]:
    """Gated delta rule returning (o, v̂, state): the GPU kernel when enabled; else sequential
    for short inputs and chunked for long ones. cached: the call fills a cache (generation) and
    no gradient goes through it, so on the CPU the chunked form may run as one C call
    (`cpu_scan.gated_delta_c`), which skips v̂ (None) when with_v_hat is false."""
    if kernels.kernels_enabled():
        if scan_kernel.supported(q, v):
            if state is None:
                state = mx.zeros((q.shape[0], v.shape[2], v.shape[3], q.shape[3]), mx.float32)
            return _gated_delta_gpu(q, k, v, g, beta, state)
        kernels.warn_fallback("gated-delta", f"head_dim {q.shape[-1]} is not a multiple of 32")
    T = q.shape[1]
    if T <= SEQUENTIAL_MAX_T:
        return gated_delta_sequential(q, k, v, g, beta, state)
    if cached and cpu_scan.available():
        return cpu_scan.gated_delta_c(q, k, v, g, beta, state, chunk_size_for(T), with_v_hat)
    return gated_delta_chunked(q, k, v, g, beta, state, chunk_size=chunk_size_for(T))


def chunk_size_for(T: int) -> int:
    """The chunked scan's chunk for T steps: 64, less for short inputs (less padding)."""
    return min(64, max(16, 1 << (T - 1).bit_length()))


def runs_c_scan(T: int, cached: bool) -> bool:
    """Whether `gated_delta` of T steps runs as the C helper's call (`cpu_scan.gated_delta_c`),
    which can also apply the layer's output norm (`cpu_scan.OutputNorm`)."""
    long_enough = cached and T > SEQUENTIAL_MAX_T
    return long_enough and not kernels.kernels_enabled() and cpu_scan.available()


@mx.custom_function
def _gated_delta_gpu(q, k, v, g, beta, state):
    """The scan kernel forward; gradients through the chunked ops form."""
    kernel = scan_kernel.CUDA_KERNEL if kernels.BACKEND == "cuda" else scan_kernel.METAL_KERNEL
    return tuple(scan_kernel.call(kernel, q, k, v, g, beta, state))


@_gated_delta_gpu.vjp
def _gated_delta_gpu_vjp(primals, cotangents, outputs):
    return tuple(mx.vjp(gated_delta_chunked, list(primals), list(cotangents))[1])
