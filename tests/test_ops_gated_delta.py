"""The chunked gated delta rule against the sequential one, mx.fast and a float64 numpy loop."""

import ham_mlx  # noqa: F401  (preloads OpenBLAS before mlx.core)

# isort: split
import contextlib

import mlx.core as mx
import numpy as np
import pytest

from ham_mlx.ops import cpu_scan
from ham_mlx.ops.gated_delta import (
    _unit_lower_inverse,
    gated_delta,
    gated_delta_chunked,
    gated_delta_sequential,
    saving_for_gradient,
)

B, H, HV, DK, DV = 2, 2, 4, 16, 32  # GVA: two value heads per q/k head


def make_inputs(T, seed=0, beta_max=2.0, decay=0.5, dtype=mx.float32, dk=DK):
    """Random (q, k, v, g, beta, state) as the GDN layer hands them over."""
    mx.random.seed(seed)
    q = mx.random.normal((B, T, H, dk))
    k = mx.random.normal((B, T, H, dk))
    q = q / mx.linalg.norm(q, axis=-1, keepdims=True) * dk**-0.5
    k = k / mx.linalg.norm(k, axis=-1, keepdims=True)
    v = mx.random.normal((B, T, HV, DV))
    g = -decay * mx.random.uniform(shape=(B, T, HV))
    beta = beta_max * mx.random.uniform(shape=(B, T, HV))
    state = mx.random.normal((B, HV, DV, dk))
    return tuple(x.astype(dtype) for x in (q, k, v, g, beta)) + (state,)


def fast_reference(q, k, v, g, beta, state):
    """mx.fast.gated_delta_update with our conventions: gamma = exp(g), beta and q as given."""
    return mx.fast.gated_delta_update(q, k, v, mx.exp(g), beta, state)


def numpy_reference(q, k, v, g, beta, state):
    """Float64 loop over time; returns (o, v_hat, state) as numpy arrays."""
    q, k, v, g, beta, S = (np.array(x, dtype=np.float64) for x in (q, k, v, g, beta, state))
    q, k = np.repeat(q, HV // H, axis=2), np.repeat(k, HV // H, axis=2)
    o, v_hat = np.zeros_like(v), np.zeros_like(v)
    for t in range(v.shape[1]):
        S = np.exp(g[:, t])[..., None, None] * S
        v_hat[:, t] = np.einsum("bhvk,bhk->bhv", S, k[:, t])
        delta = beta[:, t][..., None] * (v[:, t] - v_hat[:, t])
        S = S + np.einsum("bhv,bhk->bhvk", delta, k[:, t])
        o[:, t] = np.einsum("bhvk,bhk->bhv", S, q[:, t])
    return o, v_hat, S


def assert_close(a, b, atol=1e-5, rtol=1e-5):
    np.testing.assert_allclose(np.array(a), np.array(b), atol=atol, rtol=rtol)


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("chunk_size", [16, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("T", [1, 5, 64, 130], ids=lambda t: f"T{t}")
def test_chunked_sequential_and_fast_agree(T, chunk_size, with_state):
    q, k, v, g, beta, state = make_inputs(T)
    state = state if with_state else None
    o_ref, s_ref = fast_reference(q, k, v, g, beta, state)
    o_seq, vh_seq, s_seq = gated_delta_sequential(q, k, v, g, beta, state)
    o_chk, vh_chk, s_chk = gated_delta_chunked(q, k, v, g, beta, state, chunk_size=chunk_size)
    for o, s in ((o_seq, s_seq), (o_chk, s_chk)):
        assert o.shape == (B, T, HV, DV) and o.dtype == mx.float32
        assert s.shape == (B, HV, DV, DK) and s.dtype == mx.float32
        assert_close(o, o_ref)
        assert_close(s, s_ref)
    assert_close(vh_chk, vh_seq)


@pytest.mark.parametrize("t", [0, 1, 17, 63, 64, 99])
def test_v_hat_is_the_decayed_state_times_k(t):
    """v̂_t = alpha_t S_{t-1} k_t with S_{t-1} from mx.fast.gated_delta_update on the prefix."""
    q, k, v, g, beta, state = make_inputs(100, seed=1)
    if t == 0:
        prev = state
    else:
        _, prev = fast_reference(q[:, :t], k[:, :t], v[:, :t], g[:, :t], beta[:, :t], state)
    k_t = mx.repeat(k[:, t], HV // H, axis=1)  # [B, HV, Dk]
    expected = mx.exp(g[:, t])[..., None] * (prev @ k_t[..., None])[..., 0]  # [B, HV, Dv]
    for f in (gated_delta_sequential, gated_delta_chunked):
        _, v_hat, _ = f(q, k, v, g, beta, state)
        assert_close(v_hat[:, t], expected)


@pytest.mark.parametrize(
    "f",
    [gated_delta_sequential, lambda *a: gated_delta_chunked(*a, chunk_size=16)],
    ids=["sequential", "chunked"],
)
def test_split_sequence_equals_whole(f):
    q, k, v, g, beta, state = make_inputs(100, seed=2)
    whole = f(q, k, v, g, beta, state)
    o1, vh1, s1 = f(q[:, :37], k[:, :37], v[:, :37], g[:, :37], beta[:, :37], state)
    o2, vh2, s2 = f(q[:, 37:], k[:, 37:], v[:, 37:], g[:, 37:], beta[:, 37:], s1)
    assert_close(mx.concatenate([o1, o2], axis=1), whole[0])
    assert_close(mx.concatenate([vh1, vh2], axis=1), whole[1])
    assert_close(s2, whole[2])


def test_gradients_match_sequential():
    inputs = make_inputs(37, seed=3)
    mx.random.seed(4)
    w_o, w_vh = mx.random.normal((B, 37, HV, DV)), mx.random.normal((B, 37, HV, DV))
    w_s = mx.random.normal((B, HV, DV, DK))

    def loss(f):
        def scalar(*args):
            o, v_hat, state = f(*args)
            return (o * w_o).sum() + (v_hat * w_vh).sum() + (state * w_s).sum()

        return scalar

    argnums = list(range(6))  # q, k, v, g, beta, state
    grads_seq = mx.grad(loss(gated_delta_sequential), argnums=argnums)(*inputs)
    chunked = loss(lambda *a: gated_delta_chunked(*a, chunk_size=16))
    grads_chk = mx.grad(chunked, argnums=argnums)(*inputs)
    for gs, gc in zip(grads_seq, grads_chk):
        assert bool(mx.all(mx.isfinite(gc)))
        assert_close(gc, gs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "fp16"])
def test_half_precision_inputs_compute_in_fp32(dtype):
    half = make_inputs(70, seed=5, dtype=dtype)
    full = make_inputs(70, seed=5)
    rounded = tuple(x.astype(mx.float32) for x in half)
    tol = 3e-2 if dtype == mx.bfloat16 else 5e-3
    for f in (gated_delta_sequential, gated_delta_chunked):
        out = f(*half)
        assert all(x.dtype == mx.float32 for x in out)
        for a, b, c in zip(out, f(*rounded), f(*full)):
            assert_close(a, b)  # fp32 arithmetic on the rounded inputs
            assert_close(a, c, atol=tol, rtol=tol)  # within half precision of the fp32 result


@pytest.mark.parametrize("form", ["mlx", "c"])
@pytest.mark.parametrize(
    "decay, beta_max, dk",
    [(0.0, 2.0, 16), (0.0, 2.0, 64), (0.01, 2.0, 8), (400.0, 1.0, 16), (20.0, 1.0, 128)],
    ids=["no-decay-beta2", "no-decay-beta2-dk64", "slow-decay-dk8", "decay-underflows", "steep"],
)
def test_chunked_against_float64(decay, beta_max, dk, form):
    """Hard cases for the chunk-64 triangular solve: reflections (beta = 2), no decay, alpha = 0,
    steep decays over a whole chunk; the MLX chunked scan and its C form (cached prefill)."""
    if form == "c" and not cpu_scan.available():
        pytest.skip("the C scan helper is not built here")
    chunked = gated_delta_chunked if form == "mlx" else cpu_scan.gated_delta_c
    q, k, v, g, beta, state = make_inputs(128, seed=6, beta_max=beta_max, decay=decay, dk=dk)
    if beta_max == 2.0:
        beta = mx.full(beta.shape, 2.0)
    ref = numpy_reference(q, k, v, g, beta, state)
    scale = max(np.abs(r).max() for r in ref)
    for out, r in zip(chunked(q, k, v, g, beta, state, chunk_size=64), ref):
        assert bool(mx.all(mx.isfinite(out)))
        np.testing.assert_allclose(np.array(out), r, atol=1e-5 * scale, rtol=0)


def test_unit_lower_inverse():
    mx.random.seed(7)
    C = 64
    k = mx.random.normal((3, C, 8))
    k = k / mx.linalg.norm(k, axis=-1, keepdims=True)
    L = 2.0 * mx.tril(k @ k.swapaxes(-1, -2), k=-1)  # beta = 2, no decay
    eye = mx.eye(C)
    assert_close(_unit_lower_inverse(L) @ (eye + L), mx.broadcast_to(eye, L.shape), atol=1e-4)


@pytest.mark.parametrize("T", [1, 8, 9, 40, 100], ids=lambda t: f"T{t}")
def test_dispatcher(T):
    inputs = make_inputs(T, seed=8)
    for a, b in zip(gated_delta(*inputs), gated_delta_sequential(*inputs)):
        assert_close(a, b)


@pytest.mark.parametrize("used", ["all", "o-only", "state-only"])
@pytest.mark.parametrize(
    "T,chunk_size", [(37, 16), (64, 64), (130, 64)], ids=["pad", "one", "three"]
)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("saving", [False, True], ids=["recomputed", "saved"])
def test_written_gradient_matches_autodiff(T, chunk_size, used, compiled, saving):
    """The chunked scan's written-out gradient against MLX's autodiff of the same forward (GVA,
    padded last chunks, an initial state, outputs left unused), with the forward's terms
    recomputed by the gradient or saved for it (`saving_for_gradient`)."""
    inputs = make_inputs(T, seed=7)
    mx.random.seed(8)
    w_o, w_vh = mx.random.normal((B, T, HV, DV)), mx.random.normal((B, T, HV, DV))
    w_s = mx.random.normal((B, HV, DV, DK))

    def loss(autodiff):
        def scalar(*args):
            with saving_for_gradient() if saving else contextlib.nullcontext():
                o, v_hat, state = gated_delta_chunked(*args, chunk_size=chunk_size,
                                                      autodiff=autodiff)  # fmt: skip
            parts = {"all": [(o * w_o).sum(), (v_hat * w_vh).sum(), (state * w_s).sum()],
                     "o-only": [(o * w_o).sum()], "state-only": [(state * w_s).sum()]}  # fmt: skip
            return sum(parts[used])

        g = mx.grad(scalar, argnums=list(range(6)))
        return mx.compile(g) if compiled else g

    written, auto = loss(False)(*inputs), loss(True)(*inputs)
    for a, b in zip(written, auto):
        assert bool(mx.all(mx.isfinite(a)))
        assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_autodiff_switch(monkeypatch):
    """HAM_MLX_AUTODIFF_SCAN=1 selects the autodiff twin; both give the same forward."""
    from ham_mlx.ops import gated_delta as module

    inputs = make_inputs(40, seed=9)
    written = gated_delta_chunked(*inputs, chunk_size=16)
    monkeypatch.setenv("HAM_MLX_AUTODIFF_SCAN", "1")
    assert module.autodiff_requested()
    for a, b in zip(gated_delta_chunked(*inputs, chunk_size=16), written):
        assert_close(a, b)
