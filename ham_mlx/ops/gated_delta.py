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
        u        = U - W S0ᵀ,  [W | U] = (I + beta A)^-1 (beta [gamma k | v])
        v̂        = gamma (k S0ᵀ) + A u  = (gamma k - A W) S0ᵀ + A U
        o        = gamma (q S0ᵀ) + Aq u = (gamma q - Aq W) S0ᵀ + Aq U
        S_endᵀ   = gamma_C S0ᵀ + Σ_s D[C, s] k_s u_sᵀ = M S0ᵀ + N
    Everything except the carry S0ᵀ -> M S0ᵀ + N is computed for all chunks at once.
    """
    q, k, v, g, beta, S = _prepare(q, k, v, g, beta, state)
    B, T, HV, Dk = k.shape
    Dv = v.shape[-1]
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

    q, k, v = (mx.contiguous(chunks(x)) for x in (q, k, v))  # [NC, B, HV, C, D]
    g, beta = chunks(g)[..., None], chunks(beta)[..., None]  # [NC, B, HV, C, 1]

    # D[t, s] = prod_{s < r <= t} alpha_r by cumprod: no overflow, and mx.exp is slow on CPU.
    alpha = mx.exp(g)
    strict = mx.tri(C, k=-1)  # s < t
    D = mx.cumprod(mx.where(strict.astype(mx.bool_), alpha, 1.0), axis=-2) * mx.tri(C)
    gamma = mx.cumprod(alpha, axis=-2)  # [NC, B, HV, C, 1]
    kt = k.swapaxes(-1, -2)  # [NC, B, HV, Dk, C]
    A = (D * strict) * (k @ kt)  # [NC, B, HV, C, C]
    AA = mx.concatenate([D * (q @ kt), A], axis=-2)  # [Aq; A]: [NC, B, HV, 2C, C]

    Tinv = _unit_lower_inverse(beta * A)
    gk = gamma * k
    W = Tinv @ (beta * gk)  # [NC, B, HV, C, Dk]
    U = Tinv @ (beta * v)  # [NC, B, HV, C, Dv]
    P = mx.concatenate([gamma * q, gk], axis=-2) - AA @ W  # [NC, B, HV, 2C, Dk]
    R = AA @ U  # [NC, B, HV, 2C, Dv]

    dkt = (D[..., -1, :, None] * k).swapaxes(-1, -2)  # D[C, s] k_s: [NC, B, HV, Dk, C]
    M = gamma[..., -1:, :] * mx.eye(Dk) - dkt @ W  # [NC, B, HV, Dk, Dk]
    N = dkt @ U  # [NC, B, HV, Dk, Dv]

    St = S.swapaxes(-1, -2)  # [B, HV, Dk, Dv]
    starts = []
    for c in range(NC):
        starts.append(St)
        St = mx.addmm(N[c], M[c], St)
    out = mx.addmm(R, P, mx.stack(starts))  # [NC, B, HV, 2C, Dv]: [o; v̂]

    def unchunk(x):  # [NC, B, HV, C, Dv] -> [B, T, HV, Dv]
        return x.transpose(1, 0, 3, 2, 4).reshape(B, NC * C, HV, Dv)[:, :T]

    return unchunk(out[..., :C, :]), unchunk(out[..., C:, :]), St.swapaxes(-1, -2)


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
