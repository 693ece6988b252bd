"""Wall-clock timing: medians of repeated runs after unmeasured warm-up runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
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


def interleaved_step_samples(
    runners: Sequence[Any], warmup: int, repeats: int, steps: int
) -> dict[str, list[float]]:
    """Seconds of each runner's `step()` by `name`: `warmup` untimed steps each, then `repeats`
    rounds of `steps` timed steps per runner, the order rotating every round, so that a slow
    moment of a shared machine hits all of them alike."""
    samples: dict[str, list[float]] = {r.name: [] for r in runners}
    for r in runners:
        for _ in range(warmup):
            r.step()
    for k in range(repeats):
        k %= len(runners)
        for r in [*runners[k:], *runners[:k]]:
            for _ in range(steps):
                t = time.perf_counter()
                r.step()
                samples[r.name].append(time.perf_counter() - t)
    return samples
