"""Which GPU backend MLX runs on, and the per-backend prelude around one shared kernel body.

Each kernel is written once, in the common subset of Metal and CUDA C++: `auto` pointers, float
math (`exp`, `rsqrt`, `max`), `simd_sum` over 32-lane groups, Metal's thread-position names,
template constants (Metal template parameters / CUDA `constexpr`), and scalars passed as
one-element arrays (read as `name[0]`). The CUDA prelude defines the Metal names from CUDA's
built-ins; the Metal side needs nothing but the counter hook.
"""

from __future__ import annotations

import os

import mlx.core as mx

# Counts events (e.g. keys visited) in the Linux emulation of the Metal kernels; nothing on GPUs.
COUNTER_HOOK = """
#ifndef HAM_COUNT
#define HAM_COUNT(name)
#endif
"""

METAL_HEADER = COUNTER_HOOK

CUDA_HEADER = (
    COUNTER_HOOK
    + """
__device__ __forceinline__ float simd_sum(float x) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}
"""
)

# Inserted at the top of every CUDA kernel body: Metal's names from CUDA's built-ins.
CUDA_BODY_PRELUDE = """
  const uint3 thread_position_in_grid = make_uint3(
      blockIdx.x * blockDim.x + threadIdx.x,
      blockIdx.y * blockDim.y + threadIdx.y,
      blockIdx.z * blockDim.z + threadIdx.z);
  const uint3 thread_position_in_threadgroup = threadIdx;
  const unsigned thread_index_in_simdgroup =
      (threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) % 32u;
"""


def gpu_backend() -> str | None:
    """'metal', 'cuda' or None (CPU only)."""
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None


BACKEND = gpu_backend()


def kernels_enabled() -> bool:
    """Use the kernels: a GPU backend, the GPU is the default device, HAM_MLX_NO_KERNELS unset."""
    if BACKEND is None or os.environ.get("HAM_MLX_NO_KERNELS", "") not in ("", "0"):
        return False
    return mx.default_device() == mx.gpu


def build(name: str, inputs: list[str], outputs: list[str], body: str, backend: str | None):
    """The kernel object for a backend (Metal objects can be built, not run, without Metal)."""
    if backend == "cuda":
        return mx.fast.cuda_kernel(
            name=name, input_names=inputs, output_names=outputs,
            source=CUDA_BODY_PRELUDE + body, header=CUDA_HEADER,
        )  # fmt: skip
    return mx.fast.metal_kernel(
        name=name, input_names=inputs, output_names=outputs, source=body, header=METAL_HEADER
    )
