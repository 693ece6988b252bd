"""Compile the CUDA versions of the kernels with nvcc (when present), as MLX's cuda_kernel would
assemble them: MLX's header, ours, the generated signature, template constants, prelude + body.
This checks that the shared kernel bodies are valid CUDA; running them needs an NVIDIA GPU."""

import ham_mlx  # noqa: F401

# isort: split
import shutil
import subprocess

import pytest

from ham_mlx.kernels import attention, scan
from ham_mlx.kernels.backend import CUDA_BODY_PRELUDE, CUDA_HEADER

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")

CUDA_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
# Stands in for "mlx/backend/cuda/device/utils.cuh", which ships only with MLX's CUDA build.
MLX_HEADER = """
#include <cstdint>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cooperative_groups.h>
"""


def cuda_source(name, inputs, input_types, outputs, body, template):
    """The translation unit MLX's cuda_kernel builds (mlx/backend/cuda/custom_kernel.cpp)."""
    params = [f"    const {t}* {n}" for n, t in zip(inputs, input_types)]
    params += [f"    float* {n}" for n in outputs]
    consts = []
    for key, value in template:
        if isinstance(value, bool):
            consts.append(f"  constexpr bool {key} = {'true' if value else 'false'};")
        elif isinstance(value, int):
            consts.append(f"  constexpr int {key} = {value};")
        else:
            consts.append(f"  using {key} = {value};")
    return (
        MLX_HEADER + CUDA_HEADER + "namespace mlx::core::cu {\nnamespace cg = cooperative_groups;\n"
        f"__global__ void custom_kernel_{name}(\n" + ",\n".join(params) + ") {\n"
        + "\n".join(consts) + "\n" + CUDA_BODY_PRELUDE + body + "\n}\n} // namespace\n"
    )  # fmt: skip


def nvcc_compile(tmp_path, source):
    path = tmp_path / "kernel.cu"
    path.write_text(source)
    run = subprocess.run(
        [NVCC, "-std=c++17", "-arch=sm_80", "-c", str(path), "-o", str(tmp_path / "kernel.o")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scan_kernel_compiles_for_cuda(tmp_path, dtype):
    t = CUDA_TYPES[dtype]
    types = [t, t, t, "float", "float", "float", "int32_t"]
    template = [("InT", t), ("Dk", 64), ("Dv", 128), ("H", 2), ("HV", 4)]
    nvcc_compile(tmp_path, cuda_source("ham_gated_delta", scan.INPUTS, types, scan.OUTPUTS,
                                       scan.BODY, template))  # fmt: skip


@pytest.mark.parametrize("has_bias", [False, True])
def test_attention_kernel_compiles_for_cuda(tmp_path, has_bias):
    t = CUDA_TYPES["float16"]
    types = [t, t, t, "int32_t", "int32_t", "int32_t"] + ["float"] * 5 + ["int32_t", "float"]
    template = [("InT", t), ("Dk", 64), ("Dv", 64), ("H", 2), ("HV", 4), ("HAS_BIAS", has_bias)]
    src = cuda_source("ham_admitted_attention", attention.INPUTS, types, attention.OUTPUTS,
                      attention.BODY, template)  # fmt: skip
    nvcc_compile(tmp_path, src)
