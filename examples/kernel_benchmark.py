"""Time the GPU kernels against the MLX-ops paths they replace (needs Metal or mlx[cuda]).

    python examples/kernel_benchmark.py            # on a Mac with Apple silicon
    python examples/kernel_benchmark.py --T 8192

Prints the device, MLX version, and per case the median time of the kernel and of the ops path,
and their ratio. On a machine without a GPU backend it says so and exits.
"""

import argparse
import platform
import statistics
import sys
import time
from functools import partial

import ham_mlx  # noqa: F401  (first: OpenBLAS on Linux)

# isort: split
import mlx.core as mx
import numpy as np

from ham_mlx import kernels
from ham_mlx.kernels import attention, scan
from ham_mlx.ops.attention import compact_attention, gated_output
from ham_mlx.ops.gated_delta import gated_delta_chunked, gated_delta_sequential


def median_ms(fn, repeats):
    mx.eval(fn())  # warm-up (and kernel compilation)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(fn())
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def report(case, t_kernel, ops_name, t_ops):
    ratio = t_ops / t_kernel
    print(f"{case:<28} kernel {t_kernel:8.3f} ms | {ops_name} {t_ops:8.3f} ms | x{ratio:.2f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--T", type=int, default=4096, help="prompt length for the scan (4096)")
    p.add_argument("--cache", type=int, default=4096, help="admitted tokens in the cache (4096)")
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()
    if kernels.BACKEND is None:
        print("MLX has no GPU backend on this machine: nothing to benchmark.")
        return 1
    mx.set_default_device(mx.gpu)
    print(f"{platform.platform()} | MLX {mx.__version__} | backend {kernels.BACKEND}")
    kernel_of = {"metal": (scan.METAL_KERNEL, attention.METAL_KERNEL)}
    scan_k, attn_k = kernel_of.get(kernels.BACKEND, (scan.CUDA_KERNEL, attention.CUDA_KERNEL))
    rng = np.random.default_rng(0)

    def r(*s):
        return mx.array(rng.normal(size=s).astype(np.float32) * 0.1)

    B, H, HV, Dk, Dv = 1, 8, 16, 128, 128
    for T in (1, a.T):
        args = (r(B, T, H, Dk), r(B, T, H, Dk), r(B, T, HV, Dv), -mx.abs(r(B, T, HV)),
                mx.sigmoid(r(B, T, HV)), r(B, HV, Dv, Dk))  # fmt: skip
        ops = gated_delta_sequential if T == 1 else gated_delta_chunked
        t_k = median_ms(partial(scan.call, scan_k, *args), a.repeats)
        t_o = median_ms(partial(ops, *args), a.repeats)
        report(f"scan T={T}", t_k, f"ops ({ops.__name__})", t_o)
    N = a.cache
    for L in (1, 512):
        args = (r(B, H, L, Dk), r(B, H, N, Dk), r(B, HV, N, Dv), mx.array([N], dtype=mx.int32),
                mx.arange(N)[None], mx.arange(N - L, N), r(HV), r(HV), None)  # fmt: skip
        gate, weight = r(B, L, HV), 1 + r(Dv)
        t_k = median_ms(partial(attention.call, attn_k, *args, gate, weight, 1e-6), a.repeats)
        t_o = median_ms(lambda: gated_output(compact_attention(*args), gate, weight, 1e-6),  # noqa: B023
                        a.repeats)  # fmt: skip
        report(f"attention L={L} cache={N}", t_k, "ops", t_o)
    return 0


if __name__ == "__main__":
    sys.exit(main())
