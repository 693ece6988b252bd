"""The core invariant (spec §7): full forward == token-by-token decoding == any chunking of
the prompt, for logits, admission decisions and final caches."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import LAYER_CONFIGS as CONFIGS
from conftest import make_model

from ham_mlx import kv_stats
from ham_mlx.cache import HAMCache

T = 24
CHUNKINGS = {
    "whole": [T],
    "tokens": [1] * T,
    "5-11-8": [5, 11, 8],
    "16-8": [16, 8],
    "3-1-20": [3, 1, 20],
}


def run_chunks(model, ids, sizes):
    cache = model.make_cache()
    out, i = [], 0
    for n in sizes:
        out.append(model(ids[:, i : i + n], cache))
        i += n
    logits = mx.concatenate(out, axis=1)
    mx.eval(logits)
    return logits, cache


def cache_arrays(cache):
    return [
        [np.array(a.astype(mx.float32)) if isinstance(a, mx.array) else a for a in c.state]
        for c in cache
    ]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_equals_decode_equals_chunks(name):
    layer_types, kw = CONFIGS[name]
    model = make_model(layer_types, **kw)
    ids = mx.array(np.random.default_rng(1).integers(0, 61, (2, T)))
    full = model(ids)  # no cache at all: the training path
    ref_logits, ref_cache = run_chunks(model, ids, [T])
    np.testing.assert_allclose(np.array(ref_logits), np.array(full), atol=1e-4, rtol=0)
    ref_state = cache_arrays(ref_cache)
    stats = kv_stats(ref_cache)
    for s in stats:
        if s["type"] == "ham":  # the test only means something if admission is mixed
            assert 0 < sum(s["admitted"]) < 2 * T, stats
    for chunking, sizes in CHUNKINGS.items():
        logits, cache = run_chunks(model, ids, sizes)
        np.testing.assert_allclose(
            np.array(logits), np.array(full), atol=1e-4, rtol=0, err_msg=chunking
        )
        assert [s["admitted"] for s in kv_stats(cache)] == [s["admitted"] for s in stats]
        for layer, (a, b) in enumerate(zip(cache_arrays(cache), ref_state)):
            for slot, (x, y) in enumerate(zip(a, b)):
                assert type(x) is type(y), (chunking, layer, slot)
                if not isinstance(x, np.ndarray):
                    assert x == y, (chunking, layer, slot)
                else:
                    np.testing.assert_allclose(
                        x, y, atol=1e-4, rtol=0, err_msg=f"{chunking} layer {layer} slot {slot}"
                    )


def test_batch_rows_admit_different_counts():
    model = make_model(("ham", "ham"))
    ids = mx.array(np.random.default_rng(3).integers(0, 61, (2, T)))
    _, cache = run_chunks(model, ids, [1] * T)
    counts = [c.admitted_counts() for c in cache]
    assert any(row[0] != row[1] for row in counts), counts
    # Each row of a batch equals that row run alone.
    full = model(ids)
    for b in range(2):
        alone, c1 = run_chunks(model, ids[b : b + 1], [7, 17])
        np.testing.assert_allclose(np.array(alone[0]), np.array(full[b]), atol=1e-4, rtol=0)
        assert [c.admitted_counts()[0] for c in c1] == [row[b] for row in counts]


def test_positions_and_scores_are_recorded():
    model = make_model(("ham",))
    ids = mx.array(np.random.default_rng(4).integers(0, 61, (1, T)))
    _, cache = run_chunks(model, ids, [T])
    c: HAMCache = cache[0]
    n = c.admitted_counts()[0]
    pos = np.array(c.positions[0, :n])
    assert np.all(np.diff(pos) > 0) and pos[-1] < T
    assert np.all(np.array(c.scores[0, :n]) >= 0.9)  # admitted => score >= τ
    assert pos[0] == 0  # t = 0: empty state, v̂ = 0, cosine score 1 >= τ
