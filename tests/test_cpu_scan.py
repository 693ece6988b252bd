"""The C form of the chunked scan (`ham_mlx/_scan_cpu.c`) against its twin, the MLX chunked
scan, and the sequential scan (the float64 loop's hard cases are in test_ops_gated_delta.py); and
in whole-model cached prefills."""

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from conftest import make_model
from test_ops_gated_delta import make_inputs

from ham_mlx.layers.common import gated_rms_norm
from ham_mlx.ops import cpu_scan
from ham_mlx.ops.gated_delta import gated_delta, gated_delta_chunked, gated_delta_sequential

C_BUILT = cpu_scan.available()
needs_c = pytest.mark.skipif(not C_BUILT, reason="the C scan helper is not built here")


def assert_close(a, b, atol=1e-5, rtol=1e-5):
    np.testing.assert_allclose(np.array(a), np.array(b), atol=atol, rtol=rtol)


@needs_c
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("chunk_size", [16, 32, 64], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("T", [9, 64, 130, 200], ids=lambda t: f"T{t}")
def test_c_form_equals_the_mlx_chunked_scan(T, chunk_size, with_state):
    """GVA (two value heads per q/k head), two rows, a last chunk that is not full."""
    *inputs, state = make_inputs(T, seed=T + chunk_size)
    state = state if with_state else None
    want = gated_delta_chunked(*inputs, state, chunk_size=chunk_size)
    got = cpu_scan.gated_delta_c(*inputs, state, chunk_size=chunk_size)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == mx.float32
        assert_close(a, b)
    for a, b in zip(got, gated_delta_sequential(*inputs, state)):
        assert_close(a, b, atol=2e-5, rtol=2e-5)


@needs_c
def test_c_form_without_v_hat_gives_the_same_o_and_state():
    inputs = make_inputs(150, seed=9)
    o, v_hat, S = cpu_scan.gated_delta_c(*inputs, with_v_hat=False)
    want = cpu_scan.gated_delta_c(*inputs)
    assert v_hat is None
    assert_close(o, want[0], atol=1e-6, rtol=1e-6)  # products of other heights may round apart
    assert_close(S, want[2], atol=1e-6, rtol=1e-6)


@needs_c
@pytest.mark.parametrize("threads", ["1", "2"])
def test_fast_decaying_heads_match_the_mlx_scan(monkeypatch, threads):
    """Decays of up to exp(-20) a step, as heads with large A_log give: their products inside a
    chunk fall below float32's normal range, which the helper's threads flush to zero (its twin
    keeps them; the difference is below 1e-37)."""
    monkeypatch.setenv("HAM_MLX_C_SCAN_THREADS", threads)
    *inputs, state = make_inputs(150, seed=4, decay=20.0)
    want = gated_delta_chunked(*inputs, state, chunk_size=64)
    for a, b in zip(cpu_scan.gated_delta_c(*inputs, state, chunk_size=64), want):
        assert_close(a, b)


@needs_c
def test_the_callers_floating_point_mode_is_left_as_it_was(monkeypatch):
    """The helper's threads flush denormals; the calling thread, which scans a share of the
    heads, gets its own mode back: denormals still exist after a call."""
    monkeypatch.setenv("HAM_MLX_C_SCAN_THREADS", "1")  # all of it on the calling thread
    cpu_scan.gated_delta_c(*make_inputs(70, seed=6, decay=20.0))
    tiny = np.array([1e-38], np.float32) / np.float32(16)  # a denormal, or 0 under flush-to-zero
    assert tiny[0] != 0.0


@needs_c
@pytest.mark.parametrize(
    "activation", ["swish", "sigmoid", None], ids=["silu", "sigmoid", "no-gate"]
)
@pytest.mark.parametrize("with_v_hat", [True, False], ids=["v_hat", "o-only"])
def test_the_output_norm_equals_the_layers_gated_norm_of_o(activation, with_v_hat, monkeypatch):
    """The scan writes RMSNorm(o) * weight * act(gate) instead of o: the same as the layer's
    `gated_rms_norm` of the MLX scan's o, from a strided gate (a slice of a wider projection, as
    the layer's is), on two threads; v_hat and the state unchanged."""
    monkeypatch.setenv("HAM_MLX_C_SCAN_THREADS", "2")
    *inputs, state = make_inputs(150, seed=11)
    B_, T_, HV_, Dv_ = inputs[2].shape
    mx.random.seed(12)
    wide = 3.0 * mx.random.normal((B_, T_, HV_ * Dv_ + 5))
    gate = None if activation is None else wide[..., 5:].reshape(B_, T_, HV_, Dv_)
    weight = 1.0 + mx.random.normal((Dv_,))
    norm = cpu_scan.OutputNorm(gate, weight, 1e-6, activation or "swish")
    r, v_hat, S = cpu_scan.gated_delta_c(*inputs, state, 64, with_v_hat, norm)
    o, want_v_hat, want_S = gated_delta_chunked(*inputs, state, chunk_size=64)
    assert_close(r, gated_rms_norm(o, gate, weight, 1e-6, activation or "swish"))
    assert_close(S, want_S)
    assert (v_hat is None) == (not with_v_hat)
    if with_v_hat:
        assert_close(v_hat, want_v_hat)


@needs_c
def test_an_output_gate_of_another_shape_is_refused():
    *inputs, state = make_inputs(20, seed=1)
    B_, T_, HV_, Dv_ = inputs[2].shape
    norm = cpu_scan.OutputNorm(mx.zeros((B_, T_, HV_, Dv_ + 1)), mx.ones((Dv_,)), 1e-6, "swish")
    with pytest.raises(ValueError, match="output gate"):
        cpu_scan.gated_delta_c(*inputs, state, out_norm=norm)


@needs_c
def test_c_form_reads_half_precision_inputs_in_float32():
    inputs = make_inputs(70, seed=3, dtype=mx.bfloat16)
    for a, b in zip(cpu_scan.gated_delta_c(*inputs), gated_delta_chunked(*inputs)):
        assert a.dtype == mx.float32
        assert_close(a, b)


@needs_c
def test_c_form_gives_the_same_result_on_any_number_of_threads(monkeypatch):
    """Each (row, head) is one thread's from start to end, on a one-thread BLAS: bit for bit."""
    inputs = make_inputs(150, seed=5)
    results = []
    for threads in ("1", "2", "3", "9"):
        monkeypatch.setenv("HAM_MLX_C_SCAN_THREADS", threads)
        results.append([np.array(x) for x in cpu_scan.gated_delta_c(*inputs)])
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            np.testing.assert_array_equal(a, b)


@needs_c
def test_cached_calls_take_the_c_form_and_others_the_mlx_form(monkeypatch):
    """`gated_delta(..., cached=True)` (a cache being filled: no gradient) runs the C form;
    uncached calls, which training differentiates, keep the MLX form."""
    calls = []
    real = cpu_scan.gated_delta_c
    monkeypatch.setattr(
        cpu_scan, "gated_delta_c", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    inputs = make_inputs(100, seed=2)
    for a, b in zip(gated_delta(*inputs, cached=True), gated_delta(*inputs)):
        assert_close(a, b)
    assert calls == [1]
    grad = mx.grad(lambda v: gated_delta(*inputs[:2], v, *inputs[3:])[0].sum())(inputs[2])
    assert calls == [1] and bool(mx.any(grad != 0))


@pytest.mark.parametrize("layers", [("gdn",), ("ham", "gdn")], ids=["gdn", "ham-gdn"])
def test_cached_prefill_in_chunks_equals_the_full_forward(layers):
    """A model's prompt read through its caches in chunks (the C form where it is built) gives
    the logits of one full forward pass (the MLX form), for every chunk length."""
    model = make_model(layers, vocab_size=61)
    ids = mx.array(np.random.default_rng(0).integers(0, 61, size=(2, 150)))
    full = model(ids)
    for step in (150, 64, 37):
        cache = model.make_cache()
        parts = [model(ids[:, i : i + step], cache) for i in range(0, 150, step)]
        assert_close(mx.concatenate(parts, axis=1), full, atol=1e-4, rtol=1e-4)


def test_c_form_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("HAM_MLX_NO_C_SCAN", "1")
    assert not cpu_scan.available()
