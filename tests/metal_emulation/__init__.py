"""Run the Metal source MLX generates for `mx.fast.metal_kernel` on a Linux CPU (g++ + prelude.h).

Test infrastructure, not part of the installed package: tests import it as `metal_emulation`
(pytest puts tests/ on sys.path). See `harness.py`.
"""

from .harness import (
    KernelSource,
    MetalEmulationError,
    Param,
    capture_metal_source,
    from_bfloat16_bits,
    gxx_available,
    kernel_source,
    parse_metal_source,
    run_kernel,
    to_bfloat16_bits,
)

__all__ = [
    "KernelSource", "MetalEmulationError", "Param", "capture_metal_source", "from_bfloat16_bits",
    "gxx_available", "kernel_source", "parse_metal_source", "run_kernel", "to_bfloat16_bits",
]  # fmt: skip
