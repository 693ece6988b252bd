"""Wall-clock timing: medians of repeated runs after unmeasured warm-up runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx


def median_seconds(
    fn: Callable[[], Any], repeats: int, warmup: int = 1
) -> tuple[float, list[float]]:
    """(median seconds, samples) of `repeats` calls of fn after `warmup` unmeasured calls.
    fn must finish its work before returning (see `evaluated`)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(max(repeats, 1)):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples), samples


def evaluated(fn: Callable[[], Any]) -> Callable[[], None]:
    """fn with its lazy MLX result evaluated, so that the computation itself is timed."""
    return lambda: mx.eval(fn())
