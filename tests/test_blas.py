"""OpenBLAS is loaded before MLX on Linux when it is installed (README, "Linux speed")."""

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
