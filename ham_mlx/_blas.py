"""Load OpenBLAS before MLX on Linux.

MLX's Linux CPU wheel links a reference BLAS (~6 GFLOP/s for an fp32 matmul). Loading OpenBLAS
into the global symbol scope before `mlx.core` is imported lets MLX resolve `cblas_sgemm` to it,
about 55x faster. Set HAM_MLX_NO_OPENBLAS=1 to turn this off.

When the package was built with its small C helper (`_gemv_shim.c`, compiled by `pip install`
where a C compiler exists), that helper is loaded first: MLX's `cblas_sgemm` then binds to it, and
it computes matrix-vector shapes (M = 1 or N = 1: every projection of a decode step) with its own
multi-threaded kernels, which stream the matrix at close to the machine's bandwidth (OpenBLAS
0.3.21 runs them through sgemm, 3-5x slower, and its sgemv reaches about two thirds of the
bandwidth on a decode step's shapes). HAM_MLX_GEMV_THREADS sets the threads of one product
(default: the process's CPUs, at most 4); HAM_MLX_OPENBLAS_GEMV=1 sends these products to
OpenBLAS's sgemv instead; HAM_MLX_NO_GEMV_SHIM=1 loads OpenBLAS alone.

When `mlx.core` was imported first, MLX has bound its BLAS already: if OpenBLAS is in the process
anyway (LD_PRELOAD), that is reported; otherwise a RuntimeWarning says how to get it (mlx-lm's
commands import mlx.core before any model).
"""

import contextlib
import ctypes
import glob
import os
import sys
import warnings
from collections.abc import Iterator

OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
)

loaded_openblas: str | None = None
loaded_gemv_shim: str | None = None


def _off(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _load_gemv_shim(blas_path: str) -> str | None:
    """Load the compiled shim (RTLD_GLOBAL) and bind it to the BLAS at blas_path."""
    here = os.path.dirname(os.path.abspath(__file__))
    for path in sorted(glob.glob(os.path.join(here, "_gemv_shim*.so"))):
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        lib.ham_gemv_shim_init.argtypes = [ctypes.c_char_p]
        if lib.ham_gemv_shim_init(blas_path.encode()) == 0:
            if _off("HAM_MLX_OPENBLAS_GEMV"):
                lib.ham_gemv_shim_set_own(0)
            threads = os.environ.get("HAM_MLX_GEMV_THREADS", "")
            if threads.isdigit() and int(threads) > 0:
                lib.ham_gemv_shim_set_threads(int(threads))
            return path
    return None


TOO_LATE = (
    "ham_mlx was imported after mlx.core, so MLX keeps the reference BLAS of its Linux wheel "
    "(matrix products about 50x slower). Import ham_mlx before mlx.core, or start Python with "
    "LD_PRELOAD={path} (for mlx-lm's commands, for example)."
)


def _already_loaded(path: str) -> bool:
    """Whether the library at path is in the process already (e.g. by LD_PRELOAD)."""
    try:
        ctypes.CDLL(path, mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    return True


def gemv_shim() -> ctypes.CDLL | None:
    """The loaded shim (its `cblas_sgemm` and settings), or None when it is not loaded."""
    if loaded_gemv_shim is None:
        return None
    lib = ctypes.CDLL(loaded_gemv_shim)
    lib.ham_gemv_shim_routed.restype = ctypes.c_long
    return lib


def gemv_shim_routed() -> int:
    """Matmul calls the shim has taken as matrix-vector products so far (0: not loaded)."""
    lib = gemv_shim()
    return 0 if lib is None else lib.ham_gemv_shim_routed()


def use_own_gemv(on: bool) -> None:
    """Matrix-vector products through the shim's kernels (True) or OpenBLAS's sgemv (False)."""
    lib = gemv_shim()
    if lib is not None:
        lib.ham_gemv_shim_set_own(int(on))


def gemv_threads(n: int = 0) -> int:
    """Set the threads of one matrix-vector product when n >= 1; return the number in use
    (0: the shim is not loaded)."""
    lib = gemv_shim()
    return 0 if lib is None else lib.ham_gemv_shim_set_threads(n)


@contextlib.contextmanager
def openblas_threads(n: int) -> Iterator[None]:
    """Run OpenBLAS's products on n threads inside the block (a process-wide setting, restored
    on exit); nothing happens when OpenBLAS was not loaded."""
    if loaded_openblas is None:
        yield
        return
    lib = ctypes.CDLL(loaded_openblas)
    before = lib.openblas_get_num_threads()
    lib.openblas_set_num_threads(n)
    try:
        yield
    finally:
        lib.openblas_set_num_threads(before)


def preload_openblas() -> str | None:
    """Return the path of the OpenBLAS library loaded, or None when it was not (or could not be)."""
    global loaded_openblas, loaded_gemv_shim
    if loaded_openblas or not sys.platform.startswith("linux"):
        return loaded_openblas
    if _off("HAM_MLX_NO_OPENBLAS"):
        return None
    if "mlx.core" in sys.modules:  # too late to choose: MLX has already bound its BLAS symbols
        path = next((p for p in OPENBLAS_PATHS if os.path.exists(p)), None)
        if path and _already_loaded(path):
            loaded_openblas = path
        elif path:
            warnings.warn(TOO_LATE.format(path=path), RuntimeWarning, stacklevel=3)
        return loaded_openblas
    # After a multi-threaded product, OpenBLAS's idle threads spin in sched_yield for 2^28 cycles
    # (about 0.1 s) before they sleep. Between MLX's products the C helpers run on every core, and
    # the spinning threads took a core from them (a 16k prefill's attention: 9.5 s against 6.1 s
    # with threads that sleep at once). Waking a sleeping thread costs microseconds per product.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # 2^4 cycles: the least OpenBLAS takes
    for path in OPENBLAS_PATHS:
        if os.path.exists(path):
            if not _off("HAM_MLX_NO_GEMV_SHIM"):
                loaded_gemv_shim = _load_gemv_shim(path)  # first: MLX's cblas_sgemm binds to it
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            loaded_openblas = path
            break
    return loaded_openblas
