"""Load OpenBLAS before MLX on Linux.

MLX's Linux CPU wheel links a reference BLAS (~6 GFLOP/s for an fp32 matmul). Loading OpenBLAS
into the global symbol scope before `mlx.core` is imported lets MLX resolve `cblas_sgemm` to it,
about 55x faster. Set HAM_MLX_NO_OPENBLAS=1 to turn this off.
"""

import ctypes
import os
import sys

OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
)

loaded_openblas: str | None = None


def preload_openblas() -> str | None:
    """Return the path of the OpenBLAS library loaded, or None when it was not (or could not be)."""
    global loaded_openblas
    if loaded_openblas or not sys.platform.startswith("linux"):
        return loaded_openblas
    if os.environ.get("HAM_MLX_NO_OPENBLAS", "") not in ("", "0"):
        return None
    if "mlx.core" in sys.modules:  # too late: MLX has already bound its BLAS symbols
        return None
    for path in OPENBLAS_PATHS:
        if os.path.exists(path):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            loaded_openblas = path
            break
    return loaded_openblas
