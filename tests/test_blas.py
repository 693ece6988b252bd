"""OpenBLAS is loaded before MLX on Linux when it is installed (README, "Linux speed")."""

import glob
import os
import subprocess
import sys

import pytest

from ham_mlx import _blas

HAVE_OPENBLAS = sys.platform.startswith("linux") and any(
    os.path.exists(p) for p in _blas.OPENBLAS_PATHS
)


@pytest.mark.skipif(not HAVE_OPENBLAS, reason="libopenblas0-pthread is not installed")
def test_openblas_is_loaded_unless_turned_off():
    if os.environ.get("HAM_MLX_NO_OPENBLAS", "") in ("", "0"):
        assert _blas.loaded_openblas in _blas.OPENBLAS_PATHS
    code = "import ham_mlx, ham_mlx._blas as b; print(b.loaded_openblas)"
    env = {**os.environ, "HAM_MLX_NO_OPENBLAS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "None"
    env = {k: v for k, v in os.environ.items() if k != "HAM_MLX_NO_OPENBLAS"}
    code = "import ham_mlx; print(open('/proc/self/maps').read())"
    maps = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "openblas" in maps.stdout


SHIM_BUILT = bool(glob.glob(os.path.join(os.path.dirname(_blas.__file__), "_gemv_shim*.so")))


@pytest.mark.skipif(not (HAVE_OPENBLAS and SHIM_BUILT), reason="OpenBLAS or the built shim missing")
def test_gemv_shim_routes_matrix_vector_products_and_matches_numpy():
    import mlx.core as mx
    import numpy as np

    if os.environ.get("HAM_MLX_NO_GEMV_SHIM", "") in ("", "0"):
        assert _blas.loaded_gemv_shim is not None
    rng = np.random.default_rng(0)
    before = _blas.gemv_shim_routed()
    for M, N, K in [(1, 37, 19), (23, 1, 17), (1, 1, 5), (1, 300, 700), (700, 1, 300), (5, 6, 7)]:
        a = rng.normal(size=(M, K)).astype(np.float32)
        b = rng.normal(size=(K, N)).astype(np.float32)
        ref = a.astype(np.float64) @ b
        scale = np.abs(a).astype(np.float64) @ np.abs(b)
        for A in (mx.array(a), mx.array(a.T.copy()).T):  # row-major and transposed layouts
            for B in (mx.array(b), mx.array(b.T.copy()).T):
                err = np.abs(np.array(A @ B) - ref) / scale
                assert err.max() < 1e-6, (M, N, K)
    x = mx.array(rng.normal(size=(3, 4, 1, 16)).astype(np.float32))  # batched, M = 1
    w = mx.array(rng.normal(size=(3, 4, 16, 9)).astype(np.float32))
    np.testing.assert_allclose(np.array(x @ w), np.array(x) @ np.array(w), rtol=1e-5, atol=1e-5)
    if _blas.loaded_gemv_shim is not None:
        assert _blas.gemv_shim_routed() - before >= 20  # the M = 1 and N = 1 cases above


ATTENTION_BUILT = bool(
    glob.glob(os.path.join(os.path.dirname(_blas.__file__), "_attention_cpu*.so"))
)


@pytest.mark.skipif(not HAVE_OPENBLAS, reason="libopenblas0-pthread is not installed")
def test_c_attention_is_built_where_a_compiler_is_and_loads():
    import shutil

    from ham_mlx.ops import cpu_attention

    if shutil.which("cc") or shutil.which("gcc"):
        assert ATTENTION_BUILT  # pip install compiles it where a C compiler exists
    if ATTENTION_BUILT and _blas.loaded_openblas is not None:
        env_off = os.environ.get("HAM_MLX_NO_C_ATTENTION", "") not in ("", "0")
        assert cpu_attention.available() is not env_off


@pytest.mark.skipif(not HAVE_OPENBLAS, reason="libopenblas0-pthread is not installed")
def test_importing_mlx_first_warns_unless_openblas_is_preloaded():
    path = next(p for p in _blas.OPENBLAS_PATHS if os.path.exists(p))
    code = "import mlx.core; import ham_mlx, ham_mlx._blas as b; print(b.loaded_openblas)"
    env = {k: v for k, v in os.environ.items() if k not in ("HAM_MLX_NO_OPENBLAS", "LD_PRELOAD")}

    def run(**extra):
        cmd = [sys.executable, "-c", code]
        return subprocess.run(cmd, env={**env, **extra}, capture_output=True, text=True)

    late = run()
    assert late.stdout.strip() == "None"
    assert "RuntimeWarning" in late.stderr and f"LD_PRELOAD={path}" in late.stderr
    preloaded = run(LD_PRELOAD=path)
    assert preloaded.stdout.strip() == path and "Warning" not in preloaded.stderr
    first = subprocess.run(
        [sys.executable, "-c", "import ham_mlx, mlx.core"], env=env, capture_output=True, text=True
    )
    assert first.returncode == 0 and "Warning" not in first.stderr


@pytest.mark.skipif(not HAVE_OPENBLAS, reason="libopenblas0-pthread is not installed")
def test_openblas_idle_threads_sleep_unless_the_user_says_otherwise():
    """ham_mlx asks OpenBLAS for threads that sleep as soon as a product ends (their spin took a
    core from the C helpers); a value the user set is kept."""
    code = "import os, ham_mlx; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT",
                                                            "HAM_MLX_NO_OPENBLAS")}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "4", out.stderr
    env["OPENBLAS_THREAD_TIMEOUT"] = "12"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "12", out.stderr
