"""Lanes: work split into parts that run side by side on worker threads on the CPU.

MLX computes a graph's operations one after another on one CPU stream, so on a multi-core CPU
only OpenBLAS's large products use more than one core. Two streams in one `mx.eval` do not help:
an eval keeps only about ten operations in flight, in the graph's depth-first order, so the
second stream's part starts when the first one's is almost done. `Lanes(n).run(fn, parts)`
evaluates fn(*part) for each part on a worker thread of its own, each with an MLX stream of its
own, while OpenBLAS runs on the CPUs divided by the lanes (one thread each on two cores: each
lane keeps one core busy instead of two OpenBLAS threads contending with the other lane; measured
on two cores only). User: the trainer (`ham_mlx.train.lanes`). A prefill's chunked scan split
by heads over two lanes was measured and dropped: a 4096-token prefill of the `base` preset ran
at 0.91x (all-GDN) and 1.05x (HAM-10%) of the one-piece speed, the evaluation barrier each
layer then needs costing about what the scan's halves gained.

Calls of fn itself are made one at a time (tracing or replaying a compiled function swaps the
model's shared state); the parts' arrays are evaluated on the caller's thread first (an array is
computed on the stream, so the thread, that made it).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import Any

import mlx.core as mx

from ham_mlx import _blas


def cpu_count() -> int:
    """The CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def on_cpu_cores() -> int:
    """The lanes worth running here: the CPUs this process may use (at most 2) when arrays are
    computed on the CPU, else 1 (a GPU runs one stream's operations in parallel already)."""
    return min(2, cpu_count()) if mx.default_device() == mx.cpu else 1


class _Worker:
    """A daemon thread with an MLX stream of its own, running the calls it is handed.

    Workers live as long as the process. A thread that ends destroys what MLX keeps per thread
    (its compiled graphs, whose gradient functions are Python objects); when that happens while
    the interpreter shuts down, the thread cannot take the GIL and the process aborts. A daemon
    thread that waits on its queue at exit is simply not resumed."""

    def __init__(self, name: str) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def _loop(self) -> None:
        stream = mx.new_stream(mx.default_device())  # streams belong to the thread that made them
        while True:
            fn, done = self.jobs.get()
            try:
                with mx.stream(stream):
                    done.set_result(fn())
            except BaseException as e:  # handed to the caller
                done.set_exception(e)


_workers: list[_Worker] = []
_workers_lock = threading.Lock()


def _worker(i: int) -> _Worker:
    with _workers_lock:
        while len(_workers) <= i:
            _workers.append(_Worker(f"ham-lane-{len(_workers)}"))
        return _workers[i]


class Lanes:
    """n lanes: `run` evaluates one call per part, on worker threads when there are several."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"lanes={n}: must be >= 1")
        self.n = n
        self._call_lock = threading.Lock()

    def run(self, fn: Callable[..., Any], parts: list[tuple]) -> list[Any]:
        """fn(*part) for each part, evaluated; in parallel on the lanes when there are several."""
        if self.n == 1 or len(parts) == 1:
            outs = [fn(*p) for p in parts]
            mx.eval(outs)
            return outs
        # made here, so on this thread's stream: a lane could not evaluate them
        mx.eval([a for p in parts for a in p if isinstance(a, mx.array)])
        with _blas.openblas_threads(max(1, cpu_count() // len(parts))):
            futures = []
            for i, part in enumerate(parts):
                done: Future = Future()
                _worker(i).jobs.put((partial(self._evaluate, fn, part), done))
                futures.append(done)
            return [f.result() for f in futures]

    def _evaluate(self, fn: Callable[..., Any], part: tuple) -> Any:
        with self._call_lock:  # tracing or replaying a compiled function swaps shared state
            out = fn(*part)
        mx.eval(out)
        return out
