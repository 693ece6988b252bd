"""Inference controls (spec §7): threshold override, kv_budget, max_kv_tokens with evict /
reject, and prompt caches saved to one safetensors file."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_model

from ham_mlx import kv_stats, load_prompt_cache, save_prompt_cache


def stream(model, ids, sizes, **controls):
    cache = model.make_cache(**controls)
    out, i = [], 0
    for n in sizes:
        out.append(model(ids[:, i : i + n], cache))
        i += n
    return mx.concatenate(out, axis=1), cache


def entries(cache, row=0):
    """(positions, scores) of a HAM cache row, in slot order."""
    n = cache.admitted_counts()[row]
    return np.array(cache.positions[row, :n]), np.array(cache.scores[row, :n])


def ids_for(T, B=1, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, 61, (B, T)))


def test_threshold_override_one_value_or_per_layer():
    model = make_model(("ham", "gdn", "ham"))
    ids = ids_for(20, B=2)
    _, none = stream(model, ids, [20], threshold=2.5)
    _, every = stream(model, ids, [20], threshold=-1.0)
    _, mixed = stream(model, ids, [20], threshold=[-1.0, 2.5])
    count = [s["admitted"] for s in kv_stats(none) if s["type"] == "ham"]
    assert count == [[0, 0], [0, 0]]
    assert [s["admitted"] for s in kv_stats(every) if s["type"] == "ham"] == [[20, 20]] * 2
    assert [s["admitted"] for s in kv_stats(mixed) if s["type"] == "ham"] == [[20, 20], [0, 0]]
    with pytest.raises(ValueError, match="threshold: 3 values given for 2 HAM layers"):
        model.make_cache(threshold=[0.1, 0.2, 0.3])


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5])
def test_kv_budget_holds_the_fraction(budget):
    model = make_model(("ham", "ham"))
    T = 400
    ids = ids_for(T, seed=1)
    _, cache = stream(model, ids, [64] + [1] * (T - 64), kv_budget=budget)
    for s in kv_stats(cache):
        assert abs(s["kv_fraction"][0] - budget) <= 0.03, (budget, s)


def test_max_kv_tokens_evict_keeps_the_highest_scores():
    """Layer 0's scores do not depend on its cache, so its capped cache must hold the top-N of
    the uncapped run's admitted tokens (older first on ties), however the prompt is chunked."""
    model = make_model(("ham", "ham"), ham_threshold=0.6)
    T, cap = 60, 6
    ids = ids_for(T, seed=2)
    _, free = stream(model, ids, [T])
    pos, score = entries(free[0])
    assert len(pos) > 2 * cap
    top = np.sort(pos[np.argsort(-score, kind="stable")[:cap]])
    for sizes in ([1] * T, [20, 20, 20], [T]):
        _, capped = stream(model, ids, sizes, max_kv_tokens=cap)
        got, _ = entries(capped[0])
        np.testing.assert_array_equal(got, top, err_msg=str(sizes[:3]))
        for c in capped:
            assert max(c.admitted_counts()) <= cap
            assert c.fetch()[0].shape[2] <= cap


def test_max_kv_tokens_reject_keeps_the_first_and_is_chunking_invariant():
    model = make_model(("ham", "ham"), ham_threshold=0.6)
    T, cap = 60, 6
    ids = ids_for(T, B=2, seed=3)
    _, free = stream(model, ids, [T])
    first = entries(free[0])[0][:cap]
    reference, ref_cache = stream(model, ids, [1] * T, max_kv_tokens=cap, kv_policy="reject")
    np.testing.assert_array_equal(entries(ref_cache[0])[0], first)
    for sizes in ([T], [7, 30, 23]):
        logits, cache = stream(model, ids, sizes, max_kv_tokens=cap, kv_policy="reject")
        np.testing.assert_allclose(np.array(logits), np.array(reference), atol=1e-4, rtol=0)
        assert cache[0].admitted_counts()[0] == cap
        for c, r in zip(cache, ref_cache):
            assert c.admitted_counts() == r.admitted_counts()
            assert max(c.admitted_counts()) <= cap
            np.testing.assert_array_equal(entries(c, 1)[0], entries(r, 1)[0])


def test_memory_stays_bounded_on_a_long_stream():
    model = make_model(("ham",), ham_threshold=0.5)
    cap = 16
    cache = model.make_cache(max_kv_tokens=cap)
    for i in range(0, 1200, 1):
        model(ids_for(1, seed=i), cache)
    s = kv_stats(cache)[0]
    assert s["seen"] == 1200 and s["admitted"] == [cap]
    assert cache[0].keys.shape[2] <= cap + 256  # the buffer never grew past one step
    assert s["kv_bytes"] <= cap * s["full_kv_bytes"] / 1200


def test_bad_controls_are_refused():
    model = make_model(("ham",))
    with pytest.raises(ValueError, match="kv_policy"):
        model.make_cache(max_kv_tokens=4, kv_policy="drop")
    with pytest.raises(ValueError, match="max_kv_tokens"):
        model.make_cache(max_kv_tokens=0)
    with pytest.raises(ValueError, match="kv_budget"):
        model.make_cache(kv_budget=1.5)


@pytest.mark.parametrize("layers", [("ham", "gdn", "attn", "ham")])
def test_prompt_cache_round_trip(tmp_path, layers):
    model = make_model(layers, attn={"num_heads": 2, "num_kv_heads": 1, "window_size": 6})
    ids = ids_for(30, B=2, seed=5)
    _, cache = stream(model, ids[:, :20], [20], max_kv_tokens=9, kv_policy="reject")
    save_prompt_cache(tmp_path / "p.safetensors", cache, {"prompt": "twenty tokens"})
    loaded, meta = load_prompt_cache(tmp_path / "p.safetensors", return_metadata=True)
    assert meta == {"prompt": "twenty tokens"}
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    for t in range(20, 30):
        a = model(ids[:, t : t + 1], cache)
        b = model(ids[:, t : t + 1], loaded)  # the window cache was saved with its W-1 entries
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5, rtol=0)
    assert [s["admitted"] for s in kv_stats(loaded)] == [s["admitted"] for s in kv_stats(cache)]
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_prompt_cache(tmp_path / "bad.safetensors")


def test_steady_threshold_admits_the_budget_of_recent_scores_whatever_the_debt():
    from ham_mlx.admission import BudgetRow, budget_thresholds

    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 2, size=(2, 400)).astype(np.float32)
    rows = [BudgetRow(0.25, window=400) for _ in range(2)]
    for row, s in zip(rows, scores):
        row.observe(s, np.ones_like(s, dtype=bool))  # over-admitted: big negative debt
    assert np.all(np.array(budget_thresholds(rows)) == np.inf)  # the next call pays it back
    tau = np.array(budget_thresholds(rows, steady=True))
    admitted = (scores >= tau[:, None]).mean(axis=1)
    assert np.allclose(admitted, 0.25, atol=0.005)


def test_one_quantile_rule_admits_the_ceiling_of_the_fraction():
    from ham_mlx.admission import quantile_threshold

    rng = np.random.default_rng(1)
    scores = rng.uniform(0, 2, size=(3, 37)).astype(np.float32)
    for f in (0.0, 0.01, 0.1, 0.5, 0.99, 1.0):
        tau = np.array(quantile_threshold(mx.array(scores), f))
        kept = (scores >= tau[:, None]).sum(axis=1)
        assert (kept == int(np.ceil(f * 37 - 1e-6))).all(), f
    counts = mx.array([37, 10, 1])  # only each row's first `counts` entries are its scores
    tau = np.array(quantile_threshold(mx.array(scores), 0.5, counts))
    for b, n in enumerate([37, 10, 1]):
        assert (scores[b, :n] >= tau[b]).sum() == int(np.ceil(0.5 * n))
