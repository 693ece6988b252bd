"""This machine's memory bandwidth and matmul throughput, measured in the benchmark's own run.

The decode roofline divides the bytes one decode step must read by the read bandwidth measured
here: the fastest of `repeats` runs of two kernels that stream a float32 matrix much larger than
the caches once, on all cores, as a decode step streams its weights: a matrix-vector product
through numpy's BLAS and the same product through MLX. Best-of, not median: it is a capacity, and
on a shared machine a median measures the neighbours. A plain copy (read + write) and MLX's
float32 matmul throughput (median) are reported beside it.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from ham_mlx.bench.timing import evaluated, median_seconds

COLS = 4096


def probe(size_mb: int = 256, repeats: int = 9, matmul_n: int = 2048) -> dict[str, Any]:
    rows = max(size_mb * 2**20 // (4 * COLS), 1)
    W = np.random.default_rng(0).random((rows, COLS), dtype=np.float32)
    x = np.ones(COLS, dtype=np.float32)
    nbytes = W.nbytes
    _, t_np = median_seconds(lambda: W @ x, repeats)
    dst = np.empty_like(W)
    _, t_copy = median_seconds(lambda: np.copyto(dst, W), repeats)
    dst = None  # free it before the MLX copies
    Wm, xm = mx.array(W), mx.ones((1, COLS))
    A = mx.random.normal((matmul_n, matmul_n))
    mx.eval(Wm, xm, A)
    _, t_mx = median_seconds(evaluated(lambda: xm @ Wm.T), repeats)
    t_mm, _ = median_seconds(evaluated(lambda: A @ A), max(repeats // 2, 3))
    numpy_read, mlx_read = nbytes / min(t_np) / 1e9, nbytes / min(t_mx) / 1e9
    return {
        "bytes": nbytes,
        "read_gbps": max(numpy_read, mlx_read),  # the roofline's bandwidth
        "numpy_matvec_gbps": numpy_read,
        "mlx_matvec_gbps": mlx_read,
        "copy_gbps": 2 * nbytes / min(t_copy) / 1e9,  # read + write
        "matmul_n": matmul_n,
        "mlx_matmul_gflops": 2 * matmul_n**3 / t_mm / 1e9,
    }
