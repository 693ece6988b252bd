"""Weights onto transparent huge pages (`ham_mlx.huge_pages`): the memory moves, what it holds
does not change, and a model's first decode step starts it once."""

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split
import re
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_model

from ham_mlx import huge_pages

MiB = 1 << 20


def thp_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return re.search(r"\[(\w+)\]", text).group(1)


def kernel_at_least(major: int, minor: int) -> bool:
    release = re.match(r"(\d+)\.(\d+)", Path("/proc/sys/kernel/osrelease").read_text())
    return (int(release.group(1)), int(release.group(2))) >= (major, minor)


collapses = pytest.mark.skipif(
    sys.platform != "linux" or thp_mode() in (None, "never") or not kernel_at_least(6, 1),
    reason="needs Linux 6.1+ with transparent huge pages on (MADV_COLLAPSE)",
)


def huge_kib_between(lo: int, hi: int) -> int:
    """AnonHugePages of the memory mappings that overlap [lo, hi) (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            inside = int(head.group(1), 16) < hi and lo < int(head.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1])
    return total


@collapses
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.uint32])
def test_an_array_moves_to_huge_pages_and_keeps_its_values(monkeypatch, dtype):
    monkeypatch.delenv("HAM_MLX_NO_HUGE_PAGES", raising=False)
    a = (mx.arange(3 * MiB) % 1000).astype(dtype)  # 6-12 MiB
    mx.eval(a)
    want = np.array(a.astype(mx.float32))
    ((lo, hi),) = huge_pages.huge_spans([a])
    assert lo % huge_pages.HUGE_PAGE == 0 and hi % huge_pages.HUGE_PAGE == 0
    start, end = huge_pages.memory_range(a)
    assert start <= lo < hi <= end and hi - lo >= a.nbytes - 2 * huge_pages.HUGE_PAGE
    assert huge_pages.advise([a]) == hi - lo
    # the kernel reports huge pages there: not always all of them (once, in a whole suite run,
    # 6 of the 10 MiB moved, in the heap)
    assert huge_kib_between(lo, hi) >= huge_pages.HUGE_PAGE // 1024
    np.testing.assert_array_equal(np.array(a.astype(mx.float32)), want)


def test_small_arrays_and_strided_views_are_left_alone():
    small = mx.zeros((512, 512))  # 1 MiB
    view = mx.zeros((4096, 1024))[:, :512]  # strided: numpy sees no single span
    mx.eval(small, view)
    assert huge_pages.memory_range(view) is None
    assert huge_pages.huge_spans([small, view]) == []
    assert huge_pages.advise([small, view]) == 0


def test_it_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("HAM_MLX_NO_HUGE_PAGES", "1")
    a = mx.zeros((4 * MiB,))
    mx.eval(a)
    assert huge_pages.advise([a]) == 0
    assert huge_pages.advise_in_background([a]) is None


@collapses
def test_the_first_decode_step_moves_the_weights_once(monkeypatch):
    monkeypatch.delenv("HAM_MLX_NO_HUGE_PAGES", raising=False)
    model = make_model(("gdn", "ham"), vocab_size=8192, hidden_size=256)  # a 8 MiB head
    cache = model.make_cache()
    model(mx.array([[1, 2, 3, 4]]), cache)  # prefill: nothing moves
    assert "_huge_pages" not in model.__dict__
    model(mx.array([[5]]), cache)
    thread = model.__dict__["_huge_pages"]
    assert thread is not None
    thread.join(timeout=60)
    assert not thread.is_alive()
    model(mx.array([[6]]), cache)
    assert model.__dict__["_huge_pages"] is thread  # not again
