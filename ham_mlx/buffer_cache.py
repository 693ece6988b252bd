"""MLX's buffer cache on the CPU: big enough to reuse a step's buffers, emptied between chunks.

MLX keeps freed buffers for reuse up to a cache limit, and reuses one only for a request of about
the same size. With MLX 0.32 on Linux the CPU limit starts at 32 MiB, so every buffer larger than
that (attention logits at long context, a training batch's activations) went back to the system
when freed, and the next one of that size page-faulted all of its memory again: an elementwise op
over a 40 MB array ran at 3 GB/s instead of 15-20. A full cache is as bad: MLX then stops caching
and frees.

So, on the CPU only:
- `raise_cpu_cache_limit` (run at import) lets the cache hold HAM_MLX_CPU_CACHE_MB MiB (default:
  an eighth of the machine's memory, at most 2 GiB); it never lowers a larger limit;
  HAM_MLX_CPU_CACHE_MB=0 leaves MLX's default;
- `release_between_chunks` empties it after each prefill chunk, as mlx-lm's generation loop
  does: the buffers of a chunk have that chunk's sizes, so the next, longer-context chunk could
  not reuse them, and they would fill the cache.
"""

from __future__ import annotations

import os

import mlx.core as mx

DEFAULT_CAP_MB = 2048
mlx_limit: int | None = None  # MLX's own limit, as found by `raise_cpu_cache_limit`


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def cpu_cache_bytes() -> int:
    """The cache limit to use on the CPU, in bytes (0: leave MLX's own)."""
    given = os.environ.get("HAM_MLX_CPU_CACHE_MB", "").strip()
    if given:
        try:
            return max(0, int(given)) << 20
        except ValueError:
            raise ValueError(
                f"HAM_MLX_CPU_CACHE_MB={given!r}: expected a whole number of MiB"
            ) from None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return min(DEFAULT_CAP_MB << 20, total // 8)


def raise_cpu_cache_limit() -> int | None:
    """Raise MLX's cache limit on the CPU (see the module's text); returns the limit set, or None
    when nothing changed."""
    global mlx_limit
    if not on_cpu():
        return None
    want = cpu_cache_bytes()
    previous = mx.set_cache_limit(want)
    if mlx_limit is None:
        mlx_limit = previous
    if previous >= want:  # also HAM_MLX_CPU_CACHE_MB=0
        mx.set_cache_limit(previous)
        return None
    return want


def release_between_chunks() -> None:
    """Empty MLX's buffer cache on the CPU (between prefill chunks)."""
    if on_cpu():
        mx.clear_cache()


class SmallCache:
    """Context: MLX's cache limit at `limit` bytes inside, emptied on entry and exit (streaming
    jobs whose peak memory matters, such as conversion)."""

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self.previous: int | None = None

    def __enter__(self) -> SmallCache:
        mx.clear_cache()
        self.previous = mx.set_cache_limit(self.limit)
        return self

    def __exit__(self, *exc) -> None:
        mx.clear_cache()
        if self.previous is not None:
            mx.set_cache_limit(self.previous)
