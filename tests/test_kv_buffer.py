"""The admitted-entry buffer's two writes: `write` (a scatter of every token, the stored mask on
the device) and `write_known` (the mask read on the host, the stored tokens gathered and written
by slices) give the same entries and counts."""

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np
import pytest

from ham_mlx.cache.kv_buffer import KVBuffer


def call_inputs(rng, B, L, start, dtype):
    k = mx.array(rng.normal(size=(B, L, 3, 8)).astype(np.float32)).transpose(0, 2, 1, 3)
    v = mx.array(rng.normal(size=(B, 6, L, 4)).astype(np.float32))
    positions = mx.array(np.arange(start, start + L)[None].repeat(B, 0).astype(np.int32))
    scores = mx.array(rng.uniform(size=(B, L)).astype(np.float32))
    return k.astype(dtype), v.astype(dtype), positions, scores


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_known_write_equals_the_scatter(dtype):
    """Three calls on two rows that store different numbers of tokens (one row none at all in
    one call), past the buffer's first allocation; then a settle needs no device read."""
    rng = np.random.default_rng(0)
    scatter, known = KVBuffer(step=16), KVBuffer(step=16)
    start = 0
    for L, p in ((7, 0.5), (30, 0.7), (12, 0.3)):
        k, v, positions, scores = call_inputs(rng, 2, L, start, dtype)
        stored = rng.uniform(size=(2, L)) < p
        stored[1] = stored[1] & (L != 12)  # row 1 stores nothing in the last call
        scatter.write(k, v, positions, scores, mx.array(stored))
        known.write_known(k, v, positions, scores, stored)
        start += L
        want = scatter.settle()
        got = known.settle()
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(np.array(known.count), want)
        n = int(want.max())
        for a, b in zip(known.view(n), scatter.view(n)):
            for row, c in enumerate(want):  # slots past a row's count hold nothing

                def filled(x, row=row, c=c):
                    x = x[row, :, :c] if x.ndim == 4 else x[row, :c]
                    return np.array(x.astype(mx.float32))

                np.testing.assert_array_equal(filled(a), filled(b))
    assert known.alloc >= int(known.host_counts.max()) + 1  # room for the scratch slot


def test_settle_after_a_known_write_reads_nothing_from_the_device(monkeypatch):
    rng = np.random.default_rng(1)
    buf = KVBuffer()
    k, v, positions, scores = call_inputs(rng, 2, 10, 0, mx.float32)
    stored = rng.uniform(size=(2, 10)) < 0.5
    buf.write_known(k, v, positions, scores, stored)
    assert buf.changed  # the cache's bookkeeping (eviction, kv_budget) still runs
    monkeypatch.setattr(np, "array", None)  # settle must not convert the device counts
    counts = buf.settle()
    monkeypatch.undo()
    np.testing.assert_array_equal(counts, stored.sum(1))
