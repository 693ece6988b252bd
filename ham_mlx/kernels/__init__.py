"""GPU kernels (Metal, and CUDA through the same source) for the HAM scan and attention.

`ham_mlx.ops` dispatches to them when `kernels_enabled()`: MLX has a GPU backend, the GPU is the
default device, and HAM_MLX_NO_KERNELS is unset. Every kernel has a plain-ops reference in
`ham_mlx.ops`, used everywhere else and for gradients.
"""

import warnings

from ham_mlx.kernels.backend import BACKEND, kernels_enabled

_warned: set[str] = set()


def warn_fallback(kernel: str, why: str) -> None:
    """Say once per kernel that a shape runs on the ops path instead of the kernel."""
    if kernel not in _warned:
        _warned.add(kernel)
        warnings.warn(f"ham_mlx: {kernel} kernel not used ({why}); using MLX ops", stacklevel=3)


__all__ = ["BACKEND", "kernels_enabled", "warn_fallback"]
