"""Transparent huge pages for the weights a decode step streams (Linux).

A decode step reads every weight of the model once, hundreds of MiB, and each 4 KiB page of it
needs its own TLB entry. On 2 MiB pages the same reads run faster: the `base` preset's
526 MiB of decode weights streamed through the matrix-vector products at 20.4 GB/s on 4 KiB pages
and 27.7 GB/s on 2 MiB pages (same process, docs/benchmarks.md).

MLX allocates with malloc, which does not ask for huge pages, and where the kernel's THP mode is
"madvise" (the common default) memory gets them only when asked. `advise(arrays)` asks for each
array's memory (MADV_HUGEPAGE) and, on Linux 6.1 or later, moves its pages there at once
(MADV_COLLAPSE: it copies them, about 1.6-2 ms per MiB here). Neither changes what the memory holds.
`advise_in_background` does that on a daemon thread (madvise releases the GIL), so that the first
tokens do not wait for it. Only the 2 MiB-aligned part of an array can move; arrays under 2 MiB
are left alone. Where the calls fail (another OS, an older kernel, THP off) nothing changes; on a
GPU device nothing is tried.
HAM_MLX_NO_HUGE_PAGES=1 turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading
from collections.abc import Iterable

import mlx.core as mx
import numpy as np

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
log = logging.getLogger(__name__)
_madvise = None


def enabled() -> bool:
    """Linux, the CPU device (a GPU's memory is not this process's pages), not turned off."""
    if sys.platform != "linux" or mx.default_device() != mx.cpu:
        return False
    return os.environ.get("HAM_MLX_NO_HUGE_PAGES", "") in ("", "0")


def _libc_madvise():
    global _madvise
    if _madvise is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
        _madvise = libc.madvise
    return _madvise


def memory_range(a: mx.array) -> tuple[int, int] | None:
    """[start, end) of an evaluated, contiguous array's memory, or None where it has none that
    numpy can see (a strided view, an unreadable dtype)."""
    try:
        view = np.asarray(a if a.dtype != mx.bfloat16 else a.view(mx.uint16))
    except (TypeError, ValueError, RuntimeError):
        return None
    if not view.flags["C_CONTIGUOUS"] or view.nbytes == 0:
        return None
    start = view.ctypes.data
    return start, start + view.nbytes


def huge_spans(arrays: Iterable[mx.array]) -> list[tuple[int, int]]:
    """The 2 MiB-aligned [start, end) inside each array's memory (evaluating the arrays; none
    for arrays under 2 MiB or without such a part)."""
    spans = {}
    for a in arrays:
        if a.nbytes < HUGE_PAGE:
            continue
        mx.eval(a)
        span = memory_range(a)
        if span is None:
            continue
        lo = -(-span[0] // HUGE_PAGE) * HUGE_PAGE
        hi = span[1] // HUGE_PAGE * HUGE_PAGE
        if hi > lo:
            spans[lo] = max(hi, spans.get(lo, hi))
    return sorted(spans.items())


def advise_spans(spans: list[tuple[int, int]]) -> int:
    """MADV_HUGEPAGE, then MADV_COLLAPSE, on each span; returns the bytes moved. Makes no MLX
    call, so it may run on any thread."""
    madvise = _libc_madvise()
    moved = 0
    for lo, hi in spans:
        if madvise(lo, hi - lo, MADV_HUGEPAGE) == 0 and madvise(lo, hi - lo, MADV_COLLAPSE) == 0:
            moved += hi - lo
    return moved


def advise(arrays: Iterable[mx.array]) -> int:
    """Put the arrays' memory on huge pages (see the module's text); returns the bytes moved
    (0 where nothing could be: not Linux, turned off, an older kernel)."""
    return advise_spans(huge_spans(arrays)) if enabled() else 0


def advise_in_background(arrays: list[mx.array]) -> threading.Thread | None:
    """`advise(arrays)` with the madvise calls on a daemon thread, which holds the arrays until
    it is done (None where there is nothing to do)."""
    if not enabled():
        return None
    spans = huge_spans(arrays)
    if not spans:
        return None

    def run(held: list[mx.array]) -> None:
        moved = advise_spans(spans)
        log.info("huge pages: moved %.0f MiB of %d arrays", moved / 2**20, len(held))

    thread = threading.Thread(target=run, args=(arrays,), name="ham-mlx-huge-pages", daemon=True)
    thread.start()
    return thread
