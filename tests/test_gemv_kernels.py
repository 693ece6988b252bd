"""The gemv shim's own matrix-vector kernels (ham_mlx/_gemv_shim.c) against float64 and against
OpenBLAS's sgemv, called through the shim's `cblas_sgemm` exactly as MLX calls it."""

import ctypes
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from ham_mlx import _blas

pytestmark = pytest.mark.skipif(_blas.gemv_shim() is None, reason="the gemv shim is not loaded")

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
P = ctypes.c_void_p


def sgemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc):
    lib = _blas.gemv_shim()
    ints, F, INT = [ctypes.c_int] * 6, ctypes.c_float, ctypes.c_int
    lib.cblas_sgemm.argtypes = [*ints, F, P, INT, P, INT, F, P, INT]
    lib.cblas_sgemm(ROW_MAJOR, ta, tb, M, N, K, alpha, A.ctypes.data, lda, B.ctypes.data, ldb,
                    beta, C.ctypes.data, ldc)  # fmt: skip


def stored(rng, rows, cols, pad):
    """A float32 matrix [rows, cols + pad] (row stride cols + pad) and its [rows, cols] part."""
    full = rng.normal(size=(rows, cols + pad)).astype(np.float32)
    return full, full[:, :cols]


def product(rng, ta, tb, M, N, K, alpha, beta, pad):
    """C = alpha op(A) op(B) + beta C through the shim; returns (C as computed, its float64
    reference, the scale of the terms, the padding columns of C before and after)."""
    A, a = stored(rng, *((M, K) if ta == NO_TRANS else (K, M)), pad)
    B, b = stored(rng, *((K, N) if tb == NO_TRANS else (N, K)), pad)
    a = a if ta == NO_TRANS else a.T
    b = b if tb == NO_TRANS else b.T
    C = rng.normal(size=(M, N + pad)).astype(np.float32)
    if beta == 0.0:
        C[:, :N] = np.nan  # never read when beta is 0
    before = C.copy()
    sgemm(ta, tb, M, N, K, alpha, A, A.shape[1], B, B.shape[1], beta, C, C.shape[1])
    c0 = np.nan_to_num(before[:, :N].astype(np.float64)) if beta else 0.0
    ref = alpha * (a.astype(np.float64) @ b) + beta * c0
    scale = abs(alpha) * (np.abs(a).astype(np.float64) @ np.abs(b)) + abs(beta) * np.abs(c0) + 1
    return C, ref, scale, before[:, N:]


SHAPES = [(1, 1, 1), (1, 7, 5), (1, 300, 33), (1, 5000, 33), (1, 64, 2000),
          (7, 1, 5), (300, 1, 33), (5000, 1, 33), (64, 1, 2000), (1, 1, 777)]  # fmt: skip


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_matrix_vector_form_matches_float64(threads):
    rng = np.random.default_rng(threads)
    old = _blas.gemv_threads()
    _blas.gemv_threads(threads)
    before = _blas.gemv_shim_routed()
    try:
        for M, N, K in SHAPES:
            for ta in (NO_TRANS, TRANS):
                for tb in (NO_TRANS, TRANS):
                    for alpha, beta, pad in ((1.0, 0.0, 0), (-0.5, 0.25, 3), (2.0, 0.0, 5)):
                        C, ref, scale, padding = product(rng, ta, tb, M, N, K, alpha, beta, pad)
                        err = np.abs(C[:, :N] - ref) / scale
                        assert err.max() < 1e-6, (M, N, K, ta, tb, alpha, beta, pad)
                        np.testing.assert_array_equal(C[:, N:], padding)  # outside C: untouched
    finally:
        _blas.gemv_threads(old)
    assert _blas.gemv_shim_routed() - before == len(SHAPES) * 12


def test_own_kernels_and_openblas_sgemv_agree_and_the_switch_works():
    rng = np.random.default_rng(7)
    for M, N, K in [(1, 3072, 768), (1664, 1, 128), (1, 256, 1664)]:
        for tb in (NO_TRANS, TRANS):
            outs = []
            for own in (True, False):
                _blas.use_own_gemv(own)
                try:
                    outs.append(product(np.random.default_rng(M + N), NO_TRANS, tb, M, N, K,
                                        1.0, 0.0, 0))  # fmt: skip
                finally:
                    _blas.use_own_gemv(True)
            (c_own, ref, scale, _), (c_blas, _, _, _) = outs
            assert np.abs(c_own - ref).max() / scale.max() < 1e-6
            assert np.abs(c_own - c_blas).max() / scale.max() < 1e-6
    del rng


def test_products_from_several_threads_at_once_are_right():
    """The thread pool serves one product at a time; the others run on their caller's thread."""
    rng = np.random.default_rng(3)
    W = rng.normal(size=(4096, 256)).astype(np.float32)
    xs = [rng.normal(size=(1, 256)).astype(np.float32) for _ in range(4)]
    refs = [x.astype(np.float64) @ W.T.astype(np.float64) for x in xs]
    bad = []

    def run(i):
        out = np.empty((1, 4096), np.float32)
        for _ in range(200):
            sgemm(NO_TRANS, TRANS, 1, 4096, 256, 1.0, xs[i], 256, W, 256, 0.0, out, 4096)
            if np.abs(out - refs[i]).max() > 1e-3:
                bad.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not bad


def test_a_forked_child_starts_its_own_threads():
    """(MLX itself cannot evaluate in a forked child, so the child calls the shim directly.)"""
    code = (
        "import os, sys, numpy as np\n"
        "sys.path.insert(0, os.path.dirname(sys.argv[1]))\n"
        "import test_gemv_kernels as t\n"
        "w = np.ones((4096, 512), np.float32); x = np.ones((1, 512), np.float32)\n"
        "def product(scale):\n"
        "    out = np.empty((1, 4096), np.float32)\n"
        "    t.sgemm(t.NO_TRANS, t.TRANS, 1, 4096, 512, scale, x, 512, w, 512, 0.0, out, 4096)\n"
        "    return out[0, 7]\n"
        "assert product(1.0) == 512\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(0 if product(2.0) == 1024 else 1)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print(os.waitstatus_to_exitcode(status), t._blas.gemv_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, __file__], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "HAM_MLX_GEMV_THREADS": "2"})  # fmt: skip
    assert out.returncode == 0 and out.stdout.split() == ["0", "2"], out.stderr


def test_mlx_decode_shapes_go_through_the_kernels():
    import mlx.core as mx

    rng = np.random.default_rng(11)
    w = rng.normal(size=(3072, 768)).astype(np.float32)
    x = rng.normal(size=(1, 768)).astype(np.float32)
    before = _blas.gemv_shim_routed()
    y = np.array(mx.array(x) @ mx.array(w).T)
    ref = x.astype(np.float64) @ w.T
    assert np.abs(y - ref).max() / (np.abs(x) @ np.abs(w).T).max() < 1e-6
    assert _blas.gemv_shim_routed() - before == 1
