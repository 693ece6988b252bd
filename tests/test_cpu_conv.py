"""The C form of the short convolution + SiLU (`ham_mlx/_conv_cpu.c`) against its twin, the MLX
form of `causal_short_conv`."""

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np
import pytest

from ham_mlx.layers.common import causal_short_conv
from ham_mlx.ops import c_helpers, cpu_conv

needs_c = pytest.mark.skipif(not cpu_conv.available(), reason="the C conv helper is not built")


def inputs(B, L, C, Kc, seed, scale=1.0, with_prev=True):
    rng = np.random.default_rng(seed)
    wide = mx.array(rng.normal(size=(B, L, C + 5)).astype(np.float32) * scale)
    x = wide[:, :, 3 : 3 + C]  # a strided view, as the layer's split hands it over
    weight = mx.array(rng.normal(size=(C, Kc, 1)).astype(np.float32))
    prev = mx.array(rng.normal(size=(B, Kc - 1, C)).astype(np.float32)) if with_prev else None
    return x, weight, prev


@needs_c
@pytest.mark.parametrize("with_prev", [False, True], ids=["zeros", "cached-inputs"])
@pytest.mark.parametrize("Kc", [2, 4])
@pytest.mark.parametrize("L", [1, 2, 3, 100])
def test_c_form_equals_the_mlx_form(L, Kc, with_prev, monkeypatch):
    monkeypatch.setattr(c_helpers, "MIN_TOKENS", 1)  # the C form for every length
    x, weight, prev = inputs(2, L, 37, Kc, seed=L * Kc, with_prev=with_prev)
    want_y, want_state = causal_short_conv(x, weight, prev)
    y, state = causal_short_conv(x, weight, prev, cached=True)
    np.testing.assert_allclose(np.array(y), np.array(want_y), atol=1e-6, rtol=1e-5)
    np.testing.assert_array_equal(np.array(state), np.array(want_state))


@needs_c
def test_silu_over_the_whole_float_range():
    """Sums from -1000 to 1000: SiLU's exponential clamps without inf or NaN."""
    x, weight, prev = inputs(1, 64, 256, 4, seed=1, scale=300.0)
    want = causal_short_conv(x, weight, prev)[0]
    got = cpu_conv.short_conv_c(x, weight[:, :, 0].T, prev)
    assert bool(mx.all(mx.isfinite(got)))
    # the sums reach about 2000, where float32 rounds at 1e-4 (the two forms add in other orders)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-4, rtol=2e-6)


@needs_c
def test_c_form_gives_the_same_result_on_any_number_of_threads(monkeypatch):
    x, weight, prev = inputs(3, 50, 64, 4, seed=2)
    results = []
    for threads in ("1", "2", "7", "1000"):
        monkeypatch.setenv("HAM_MLX_C_CONV_THREADS", threads)
        results.append(np.array(cpu_conv.short_conv_c(x, weight[:, :, 0].T, prev)))
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])


@needs_c
def test_padded_short_or_half_precision_calls_keep_the_mlx_form(monkeypatch):
    calls = []
    real = cpu_conv.short_conv_c
    monkeypatch.setattr(cpu_conv, "short_conv_c", lambda *a: calls.append(1) or real(*a))
    x, weight, prev = inputs(2, 20, 16, 4, seed=3)
    causal_short_conv(x, weight, prev, np.array([20, 7]), cached=True)
    causal_short_conv(x.astype(mx.float16), weight, prev, cached=True)
    causal_short_conv(x, weight, prev)  # uncached: training differentiates it
    causal_short_conv(x[:, :3], weight, prev, cached=True)  # a few tokens: a decode step
    assert calls == []
    causal_short_conv(x, weight, prev, np.array([20, 20]), cached=True)
    assert calls == [1]


def test_c_form_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("HAM_MLX_NO_C_CONV", "1")
    assert not cpu_conv.available()


@needs_c
def test_the_callers_floating_point_mode_is_left_as_it_was(monkeypatch):
    """The helper's threads flush denormals (a speed matter inside its SiLU); the calling thread,
    which runs a share of the work, gets its own mode back: denormals still exist after a call."""
    x, weight, prev = inputs(1, 40, 64, 4, seed=5)
    monkeypatch.setenv("HAM_MLX_C_CONV_THREADS", "1")  # all of it on the calling thread
    cpu_conv.short_conv_c(x, weight[:, :, 0].T, prev)
    tiny = np.array([1e-38], np.float32) / np.float32(16)  # a denormal, or 0 under flush-to-zero
    assert tiny[0] != 0.0
