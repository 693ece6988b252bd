"""Data-parallel lanes: one micro-batch split over worker threads on the CPU.

MLX computes a graph's operations one after another on one CPU stream, so on a multi-core CPU
only OpenBLAS's large products use more than one core: the scan's small products, the
elementwise work and the copies of a training step run on one. Two streams in one `mx.eval` do
not help: an eval keeps only about ten operations in flight, in the graph's depth-first order, so
the second stream's part starts when the first one's is almost done.

`Lanes(n)` splits each micro-batch into n parts by rows. Each part's loss and gradient are
computed and evaluated on a worker thread of its own, with an MLX stream of its own, while
OpenBLAS runs single-threaded (each lane then keeps one core busy instead of two OpenBLAS threads
contending with the other lane). `combine` weights each part by its share of the micro-batch's
counted tokens, so the loss and the gradient equal the whole micro-batch's up to float rounding.
Calls of the (compiled) step function itself are made one at a time: tracing or replaying a
compiled function swaps the model's shared state in and out.

`default_lanes()`: HAM_MLX_TRAIN_LANES, else 2 on a CPU device with two or more CPUs, else 1 (a
GPU runs one stream's operations in parallel already). Twin: lanes=1, the micro-batch in one piece.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from functools import partial
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from ham_mlx import _blas


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_lanes() -> int:
    """HAM_MLX_TRAIN_LANES when set, else 2 on a CPU device with >= 2 CPUs, else 1."""
    given = os.environ.get("HAM_MLX_TRAIN_LANES", "").strip()
    if given:
        if not given.isdigit() or int(given) < 1:
            raise ValueError(f"HAM_MLX_TRAIN_LANES={given!r}: must be an integer >= 1")
        return int(given)
    return 2 if mx.default_device() == mx.cpu and cpu_count() >= 2 else 1


def split_rows(arrays: Sequence[np.ndarray | None], n: int) -> list[tuple[np.ndarray | None, ...]]:
    """The rows of each array cut into min(n, rows) consecutive parts of near-equal size."""
    rows = next(a.shape[0] for a in arrays if a is not None)
    bounds = np.linspace(0, rows, min(n, rows) + 1).round().astype(int)
    return [
        tuple(None if a is None else a[lo:hi] for a in arrays)
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]


def combine(outs: list[tuple[mx.array, Any, list[mx.array]]], weights: Sequence[float]):
    """(loss, grads, scores) of the parts -> the whole batch's: loss and gradients weighted by
    the parts' shares of its counted tokens, each HAM layer's scores concatenated by rows."""
    if len(outs) == 1:
        return outs[0]
    loss = sum(w * o[0] for w, o in zip(weights, outs))
    grads = tree_map(lambda *g: sum(w * x for w, x in zip(weights, g)), *[o[1] for o in outs])
    scores = [mx.concatenate(layer) for layer in zip(*[o[2] for o in outs])]
    return loss, grads, scores


def token_shares(masks: Sequence[np.ndarray]) -> list[float]:
    """Each part's share of the counted (mask) tokens; equal shares when none is counted."""
    counts = [float(m.sum()) for m in masks]
    total = sum(counts)
    return [c / total for c in counts] if total > 0 else [1 / len(counts)] * len(counts)


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
        with _blas.openblas_threads(1):
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
