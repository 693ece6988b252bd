"""The C form of the head routers' surprise (`ham_mlx/_surprise_cpu.c`) against its twin, the
MLX form of `head_surprise`."""

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np
import pytest

from ham_mlx.ops import cpu_surprise
from ham_mlx.routers import head_surprise

needs_c = pytest.mark.skipif(not cpu_surprise.available(), reason="the C helper is not built")


def inputs(T, Dv, seed):
    """v̂ as the scan returns it ([B, T, 2, HV, Dv] with o first) and v as a strided slice."""
    rng = np.random.default_rng(seed)
    out = mx.array(rng.normal(size=(2, T, 2, 3, Dv)).astype(np.float32))
    wide = mx.array(rng.normal(size=(2, T, 3 * Dv + 7)).astype(np.float32))
    v_hat = out[:, :, 1]
    v = wide[:, :, 7:].reshape(2, T, 3, Dv)
    v_hat = mx.where(mx.arange(T)[None, :, None, None] % 5 == 0, 0.9 * v, v_hat)  # near matches
    return v_hat, v


@needs_c
@pytest.mark.parametrize("kind", ["cosine", "l2"])
@pytest.mark.parametrize("Dv", [8, 13, 256])
def test_c_form_equals_the_mlx_form(kind, Dv):
    v_hat, v = inputs(40, Dv, seed=Dv)
    want = head_surprise(v_hat, v, kind)
    got = head_surprise(v_hat, v, kind, cached=True)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-6, rtol=1e-5)


@needs_c
def test_c_form_gives_the_same_result_on_any_number_of_threads(monkeypatch):
    v_hat, v = inputs(200, 256, seed=3)  # enough work to be shared among threads
    want = np.array(head_surprise(v_hat, v, "cosine"))
    results = []
    for threads in ("1", "2", "7", "1000"):
        monkeypatch.setenv("HAM_MLX_C_SURPRISE_THREADS", threads)
        results.append(np.array(cpu_surprise.head_surprise_c(v_hat, v, "cosine", 1e-6)))
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])
    np.testing.assert_allclose(results[0], want, atol=2e-6, rtol=1e-5)


@needs_c
def test_zero_vectors_score_as_the_mlx_form_does():
    v_hat, v = mx.zeros((1, 20, 2, 16)), mx.zeros((1, 20, 2, 16))
    for kind in ("cosine", "l2"):
        got = cpu_surprise.head_surprise_c(v_hat, v, kind, 1e-6)
        np.testing.assert_allclose(np.array(got), np.array(head_surprise(v_hat, v, kind)))


@needs_c
def test_short_or_uncached_calls_keep_the_mlx_form(monkeypatch):
    calls = []
    real = cpu_surprise.head_surprise_c
    monkeypatch.setattr(cpu_surprise, "head_surprise_c", lambda *a: calls.append(1) or real(*a))
    v_hat, v = inputs(20, 8, seed=1)
    head_surprise(v_hat, v, "cosine")
    head_surprise(v_hat[:, :3], v[:, :3], "cosine", cached=True)  # a few tokens: decode
    assert calls == []
    head_surprise(v_hat, v, "cosine", cached=True)
    assert calls == [1]


def test_c_form_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("HAM_MLX_NO_C_SURPRISE", "1")
    assert not cpu_surprise.available()
