"""The machine and library versions a benchmark ran on."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

import mlx.core as mx

from ham_mlx import _blas
from ham_mlx.lanes import cpu_count


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, load, OS, Python and library versions, the BLAS in use."""
    cores = cpu_count()
    mem = _memory_bytes()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": _cpu_model(),
        "cores": cores,
        "memory_gb": None if mem is None else round(mem / 2**30, 1),
        "load_average": None if load is None else [round(x, 2) for x in load],
        "os": platform.platform(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "numpy": _version("numpy"),
        "mlx_lm": _version("mlx-lm"),
        "matplotlib": _version("matplotlib"),
        "device": str(mx.default_device()),
        "openblas": _blas.loaded_openblas,
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "argv": " ".join(sys.argv),
    }


def describe(info: dict[str, Any]) -> str:
    """One line for the terminal and the markdown report."""
    blas = info["openblas"] or "none (MLX's bundled reference BLAS)"
    return (
        f"{info['cpu']}, {info['cores']} cores, {info['memory_gb']} GiB | {info['os']} | "
        f"Python {info['python']}, MLX {info['mlx']}, numpy {info['numpy']}, "
        f"mlx-lm {info['mlx_lm'] or 'not installed'} | BLAS {blas} | "
        f"load average {info['load_average']}"
    )
