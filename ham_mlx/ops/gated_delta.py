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

import mlx.core as mx

from ham_mlx import kernels
from ham_mlx.kernels import scan as scan_kernel

SEQUENTIAL_MAX_T = 8  # measured crossover on Linux CPU (B=1..8, HV=4..16, Dk=64, Dv=128)


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


def gated_delta_chunked(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array | None = None,
    chunk_size: int = 64,
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
    k = qk[..., C:, :]  # [NC, B, HV, C, Dk]
    v = mx.contiguous(chunks(v))  # [NC, B, HV, C, Dv]
    g, beta = chunks(g)[..., None], chunks(beta)[..., None]  # [NC, B, HV, C, 1]

    # D[t, s] = prod_{s < r <= t} alpha_r by cumprod: no overflow, and mx.exp is slow on CPU.
    alpha = mx.exp(g)
    strict = mx.tri(C, k=-1)  # s < t
    D = mx.cumprod(mx.where(strict.astype(mx.bool_), alpha, 1.0), axis=-2) * mx.tri(C)
    gamma = mx.cumprod(alpha, axis=-2)  # [NC, B, HV, C, 1]
    AA = mx.concatenate([D, D * strict], axis=-2) * (qk @ k.swapaxes(-1, -2))  # [Aq; A]
    Tinv = _unit_lower_inverse(beta * AA[..., C:, :])  # [NC, B, HV, C, C]
    gqk = mx.concatenate([gamma, gamma], axis=-2) * qk  # [gamma q; gamma k]: [NC, B, HV, 2C, Dk]
    W = Tinv @ (beta * gqk[..., C:, :])  # [NC, B, HV, C, Dk]
    U = Tinv @ (beta * v)  # [NC, B, HV, C, Dv]
    dkt = (D[..., -1, :, None] * k).swapaxes(-1, -2)  # D[C, s] k_s: [NC, B, HV, Dk, C]
    gamma_end = gamma[..., -1:, :]  # [NC, B, HV, 1, 1]

    St = S.swapaxes(-1, -2)  # [B, HV, Dk, Dv]
    o, v_hat = [], []
    for c in range(NC):
        u = mx.addmm(U[c], W[c], St, alpha=-1.0)  # U - W S0ᵀ: [B, HV, C, Dv]
        out = mx.addmm(AA[c] @ u, gqk[c], St)  # [B, HV, 2C, Dv]: [o; v̂]
        o.append(out[..., :C, :].swapaxes(1, 2))  # [B, C, HV, Dv]
        v_hat.append(out[..., C:, :].swapaxes(1, 2))
        St = gamma_end[c] * St + dkt[c] @ u
    o = mx.concatenate(o, axis=1)[:, :T]  # [B, T, HV, Dv]
    v_hat = mx.concatenate(v_hat, axis=1)[:, :T]
    return o, v_hat, St.swapaxes(-1, -2)


def gated_delta(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: mx.array | None = None,
) -> tuple[mx.array, mx.array, mx.array]:
    """Gated delta rule returning (o, v̂, state): the GPU kernel when enabled; else sequential
    for short inputs and chunked for long ones."""
    if kernels.kernels_enabled():
        if scan_kernel.supported(q, v):
            if state is None:
                state = mx.zeros((q.shape[0], v.shape[2], v.shape[3], q.shape[3]), mx.float32)
            return _gated_delta_gpu(q, k, v, g, beta, state)
        kernels.warn_fallback("gated-delta", f"head_dim {q.shape[-1]} is not a multiple of 32")
    T = q.shape[1]
    if T <= SEQUENTIAL_MAX_T:
        return gated_delta_sequential(q, k, v, g, beta, state)
    chunk_size = min(64, max(16, 1 << (T - 1).bit_length()))  # less padding for short inputs
    return gated_delta_chunked(q, k, v, g, beta, state, chunk_size=chunk_size)


@mx.custom_function
def _gated_delta_gpu(q, k, v, g, beta, state):
    """The scan kernel forward; gradients through the chunked ops form."""
    kernel = scan_kernel.CUDA_KERNEL if kernels.BACKEND == "cuda" else scan_kernel.METAL_KERNEL
    return tuple(scan_kernel.call(kernel, q, k, v, g, beta, state))


@_gated_delta_gpu.vjp
def _gated_delta_gpu_vjp(primals, cotangents, outputs):
    return tuple(mx.vjp(gated_delta_chunked, list(primals), list(cotangents))[1])
