"""MLX's CPU buffer cache: raised at import, emptied between prefill chunks, small in conversion."""

import os
import subprocess
import sys

import mlx.core as mx
import pytest

import ham_mlx  # noqa: F401  (raises the limit at import)
from ham_mlx import buffer_cache

# Page faults per op over a 40 MB array, 20 repeats: each fault maps 4 KiB, so a freshly mapped
# result costs about 10k; a reused cached buffer about none.
FAULTS = """
import resource, sys
import ham_mlx
import mlx.core as mx
x = mx.random.normal((10 * 2**20,)); mx.eval(x)  # 40 MB
mx.eval(x * 1.0)
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    y = x * 1.0
    mx.eval(y)
    del y
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 20
limit = mx.set_cache_limit(0)
print(faults, limit)
"""


def faults_per_op(env: dict[str, str]) -> tuple[float, int]:
    """(page faults per op, the cache limit in force)"""
    run = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    faults, limit = run.stdout.split()[-2:]
    return float(faults), int(limit)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_minflt semantics")
def test_large_buffers_are_reused_not_mapped_again():
    kept, _ = faults_per_op({})
    mlx_default, mlx_limit = faults_per_op({"HAM_MLX_CPU_CACHE_MB": "0"})
    assert kept < 1000, f"{kept} page faults per op with the raised cache"
    if mlx_limit < 40 << 20:  # MLX's own limit cannot hold the 40 MB result: it maps it anew
        assert mlx_default > 5000, f"{mlx_default} page faults per op under MLX's limit"


def test_limit_at_import_and_its_switch(monkeypatch):
    previous = mx.set_cache_limit(0)
    try:
        mx.set_cache_limit(32 << 20)
        monkeypatch.setenv("HAM_MLX_CPU_CACHE_MB", "64")
        assert buffer_cache.raise_cpu_cache_limit() == 64 << 20
        assert mx.set_cache_limit(64 << 20) == 64 << 20
        monkeypatch.setenv("HAM_MLX_CPU_CACHE_MB", "16")  # never lowers a larger limit
        assert buffer_cache.raise_cpu_cache_limit() is None
        assert mx.set_cache_limit(64 << 20) == 64 << 20
        monkeypatch.setenv("HAM_MLX_CPU_CACHE_MB", "0")
        assert buffer_cache.raise_cpu_cache_limit() is None
        monkeypatch.setenv("HAM_MLX_CPU_CACHE_MB", "lots")
        with pytest.raises(ValueError, match="HAM_MLX_CPU_CACHE_MB='lots'"):
            buffer_cache.raise_cpu_cache_limit()
        monkeypatch.delenv("HAM_MLX_CPU_CACHE_MB")
        assert 0 < buffer_cache.cpu_cache_bytes() <= buffer_cache.DEFAULT_CAP_MB << 20
    finally:
        mx.set_cache_limit(previous)


def test_small_cache_restores_the_limit():
    previous = mx.set_cache_limit(123 << 20)
    try:
        x = mx.random.normal((1 << 20,))
        mx.eval(x * 2)
        with buffer_cache.SmallCache():
            assert mx.get_cache_memory() == 0
            assert mx.set_cache_limit(0) == 0
        assert mx.set_cache_limit(123 << 20) == 123 << 20
    finally:
        mx.set_cache_limit(previous)
