"""The kernels on a real GPU (Apple Metal, or NVIDIA through mlx[cuda]) against the ops
references. Skipped where MLX has no GPU backend (e.g. this Linux CPU CI); on a Mac run
`python3 -m pytest tests/test_kernels_gpu.py -v`."""

import ham_mlx  # noqa: F401

# isort: split
import mlx.core as mx
import numpy as np
import pytest

from ham_mlx import kernels
from ham_mlx.kernels import attention, scan
from ham_mlx.ops.attention import cached_admitted_attention
from ham_mlx.ops.gated_delta import gated_delta_sequential

pytestmark = pytest.mark.skipif(kernels.BACKEND is None, reason="MLX has no GPU backend here")
KERNELS = {
    "scan": scan.CUDA_KERNEL if kernels.BACKEND == "cuda" else scan.METAL_KERNEL,
    "attention": attention.CUDA_KERNEL if kernels.BACKEND == "cuda" else attention.METAL_KERNEL,
}


def scan_inputs(B, T, H, HV, Dk, Dv, dtype, seed=0):
    rng = np.random.default_rng(seed)

    def unit(*shape):
        x = rng.normal(size=shape).astype(np.float32)
        return mx.array(x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)

    q, k = unit(B, T, H, Dk) * Dk**-0.5, unit(B, T, H, Dk)
    v = mx.array(rng.normal(size=(B, T, HV, Dv)).astype(np.float32)).astype(dtype)
    g = mx.array(-rng.uniform(0.01, 0.5, (B, T, HV)).astype(np.float32))
    beta = mx.array(rng.uniform(0, 2, (B, T, HV)).astype(np.float32))
    state = mx.array(rng.normal(size=(B, HV, Dv, Dk)).astype(np.float32) * 0.1)
    return q, k, v, g, beta, state


@pytest.mark.parametrize("T", [1, 7, 300])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["fp32", "bf16"])
def test_scan_kernel_matches_reference(T, dtype):
    args = scan_inputs(2, T, 2, 4, 64, 128, dtype)
    got = scan.call(KERNELS["scan"], *args, stream=mx.gpu)
    with mx.stream(mx.cpu):
        ref = gated_delta_sequential(*args)
    tol = 1e-5 if dtype == mx.float32 else 1e-2
    for a, b in zip(got, ref):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=tol, atol=tol)


@pytest.mark.parametrize("L", [1, 17])
@pytest.mark.parametrize("bias", [False, True])
def test_attention_kernel_matches_reference(L, bias):
    rng = np.random.default_rng(1)
    B, H, HV, Dk, Dv, N = 2, 2, 4, 64, 64, 40
    f = lambda *s: mx.array(rng.normal(size=s).astype(np.float32))  # noqa: E731
    q, keys, values = f(B, H, L, Dk), f(B, H, N, Dk), f(B, HV, N, Dv)
    counts = mx.array([0, 33], dtype=mx.int32)
    pos = mx.array(np.sort(rng.choice(60, (B, N), replace=True), axis=1).astype(np.int32))
    qpos = mx.arange(60 - L, 60)
    key_bias = f(B, N) if bias else None
    args = (q, keys, values, counts, pos, qpos, f(HV) * 0.1, f(HV), key_bias, f(B, L, HV),
            f(Dv), 1e-6)  # fmt: skip
    got = attention.call(KERNELS["attention"], *args, stream=mx.gpu)
    with mx.stream(mx.cpu):
        ref = cached_admitted_attention(*args)
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-5, atol=1e-5)
    assert np.all(np.array(got)[0] == 0.0)  # row 0 has an empty cache
