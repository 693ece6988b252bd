"""The cached-prefill attention (`chunk_attention`, one product with the logits' bound folded in,
base-2 exponent; and its tiled C form `chunk_attention_c`) against their twin
`compact_attention` and the float64 reference, and the HAM layer's chunked prefill with each
against the same prefill through the twin."""

import ham_mlx  # noqa: F401  (preloads OpenBLAS before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from conftest import make_model

from ham_mlx import kv_stats
from ham_mlx.ops import attention, cpu_attention
from ham_mlx.ops.attention import (
    attention_reference,
    chunk_attention,
    compact_attention,
    fits_exp2,
)

B, DK, DV = 2, 16, 32

C_BUILT = cpu_attention.available()
needs_c = pytest.mark.skipif(not C_BUILT, reason="the C attention helper is not built here")
FORMS = [
    pytest.param(chunk_attention, id="mlx"),
    pytest.param(cpu_attention.chunk_attention_c, id="c", marks=needs_c),
]


def unit(x):
    return x / mx.linalg.norm(x, axis=-1, keepdims=True)


def cache_inputs(H, HV, L, settled, late, counts, seed=0, scale=None):
    """A compact cache of `settled + late` slots: the first `settled` slots of each row hold
    positions before the chunk, the later ones positions inside it (the chunk's own admitted
    tokens, row b keeping counts[b] slots in all). Queries are the chunk's L positions."""
    rng = np.random.default_rng(seed)
    mx.random.seed(seed)
    start = 3 * settled + 5
    n = settled + late
    q = unit(mx.random.normal((B, H, L, DK)))
    keys = unit(mx.random.normal((B, H, n, DK)))
    values = mx.random.normal((B, HV, n, DV))
    positions = np.zeros((B, n), dtype=np.int32)
    for b in range(B):
        positions[b, :settled] = np.sort(rng.choice(start, settled, replace=False))
        positions[b, settled:] = start + np.sort(rng.choice(L, late, replace=False))
    log_scale = mx.log(mx.sqrt(mx.array(DK, mx.float32))) + 0.3 * mx.random.normal((HV,))
    if scale is not None:
        log_scale = mx.full((HV,), float(np.log(scale)))
    sink = mx.random.normal((HV,))
    bias = mx.log(mx.random.uniform(1e-3, 1.0, (B, n)))
    q_pos = mx.arange(start, start + L, dtype=mx.int32)
    counts = mx.array(counts, dtype=mx.int32)
    return q, keys, values, counts, mx.array(positions), q_pos, log_scale, sink, bias


def reference(q, keys, values, counts, positions, q_pos, log_scale, sink, bias):
    """attention_reference with GVA repeated and the compact cache's mask spelled out."""
    HV, H = values.shape[1], q.shape[1]
    q, keys = mx.repeat(q, HV // H, axis=1), mx.repeat(keys, HV // H, axis=1)
    n = keys.shape[2]
    pos, cnt, qp = np.array(positions), np.array(counts), np.array(q_pos)
    mask = (np.arange(n)[None, None, :] < cnt[:, None, None]) & (
        pos[:, None, :] <= qp[None, :, None]
    )  # [B, L, n]
    return attention_reference(q, keys, values, mask[:, None], log_scale, sink, bias)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bias", [False, True], ids=["cosine", "learned"])
@pytest.mark.parametrize(
    "H, HV, L, settled, late, counts",
    [
        (2, 2, 7, 5, 3, [8, 8]),
        (2, 4, 7, 5, 3, [6, 8]),  # GVA; row 0 admitted only 1 of the chunk's tokens
        (3, 3, 1, 4, 0, [4, 2]),  # one query; a row with fewer settled entries
        (2, 2, 6, 0, 4, [4, 0]),  # empty cache before the chunk; an empty row
        (2, 2, 5, 6, 0, [6, 6]),  # the chunk admitted nothing: every slot settled, no mask
        (1, 2, 300, 300, 90, [390, 301]),  # several query and key tiles of the C form
    ],
    ids=["mha", "gva-ragged", "one-query", "first-chunk", "all-settled", "tiles"],
)
def test_matches_twin_and_reference(H, HV, L, settled, late, counts, bias, form):
    args = cache_inputs(H, HV, L, settled, late, counts)
    *args, key_bias = args
    key_bias = key_bias if bias else None
    # `settled` promises slots every row filled before the call: the smallest count of those
    done = min(settled, min(counts))
    got = form(*args, key_bias, done)
    twin = compact_attention(*args, key_bias)
    assert got.shape == twin.shape == (B, HV, L, DV) and got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), np.array(twin), atol=2e-6, rtol=1e-5)
    ref = reference(*args, key_bias)
    np.testing.assert_allclose(np.array(got), ref, atol=2e-6, rtol=1e-5)


@needs_c
@pytest.mark.parametrize("bias", [False, True], ids=["cosine", "learned"])
def test_gated_c_form_matches_gated_output_of_the_twin(bias):
    """The C form with the gated norm folded in: the HAM layer's gated output of the attention,
    from a gate that is a strided slice (as the layer's projections give it)."""
    args = cache_inputs(1, 2, 200, 300, 90, [390, 301], seed=4)
    *args, key_bias = args
    key_bias = key_bias if bias else None
    L, HV = args[0].shape[2], args[2].shape[1]
    small = mx.random.normal((B, L, 3 * HV))  # a | b | kv gate, like the layer's
    gate, weight, eps = small[..., 2 * HV :], mx.random.uniform(0.5, 1.5, (DV,)), 1e-5
    got = cpu_attention.chunk_attention_c(*args, key_bias, 300, (gate, weight, eps))
    want = attention.gated_output(compact_attention(*args, key_bias), gate, weight, eps)
    assert got.shape == want.shape == (B, L, HV, DV) and got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("form", FORMS)
def test_queries_with_nothing_to_see_get_exactly_zero(form):
    q, keys, values, counts, positions, q_pos, log_scale, sink, _ = cache_inputs(
        2, 2, 6, 0, 4, [4, 0]
    )
    got = form(q, keys, values, counts, positions, q_pos, log_scale, sink, None, 0)
    assert bool(mx.all(got[1] == 0.0))  # row 1 stored nothing
    first = int(np.array(positions)[0, 0]) - int(np.array(q_pos)[0])
    assert bool(mx.all(got[0, :, :first] == 0.0))  # before row 0's first admitted token


def test_large_scales_are_refused():
    """Beyond EXPONENT_RANGE the bound could underflow every logit: the layer takes the twin."""
    args = cache_inputs(2, 2, 5, 3, 2, [5, 5], scale=60.0)
    assert not fits_exp2(args[6], args[7], False)
    assert fits_exp2(mx.full((2,), float(np.log(11.3))), mx.zeros((2,)), True)


@pytest.mark.parametrize("c_form", [pytest.param(True, marks=needs_c), False], ids=["c", "mlx"])
@pytest.mark.parametrize("router", ["cosine", "learned"])
def test_chunked_prefill_matches_the_twin(router, c_form, monkeypatch):
    """A whole model prefilled in chunks: chunk_attention (or its C form, the default where it is
    built) against compact_attention (taken when fits_exp2 says no): logits within 1e-4, the same
    admission decisions, the same caches."""
    monkeypatch.setenv("HAM_MLX_NO_C_ATTENTION", "0" if c_form else "1")
    calls = []
    c_form_fn = cpu_attention.chunk_attention_c
    monkeypatch.setattr(
        cpu_attention, "chunk_attention_c", lambda *a: calls.append(1) or c_form_fn(*a)
    )
    model = make_model(["ham", "ham"], ham_router=router)
    ids = mx.array(np.random.default_rng(3).integers(0, 61, (2, 40)))
    scores = []
    model(ids, scores=scores)
    tau = [float(np.median(np.array(s))) for s in scores]  # about half of the tokens admitted

    def prefill():
        cache = model.make_cache(threshold=tau)
        out = [model(ids[:, i : i + n], cache) for i, n in ((0, 9), (9, 16), (25, 15))]
        logits = mx.concatenate(out, axis=1)
        mx.eval(logits)
        return np.array(logits), cache

    fast, fast_cache = prefill()
    assert bool(calls) == c_form  # the C form runs where it is built, unless turned off
    monkeypatch.setattr(attention, "fits_exp2", lambda *a: False)
    slow, slow_cache = prefill()
    np.testing.assert_allclose(fast, slow, atol=1e-4, rtol=0)
    admitted = [s["admitted"] for s in kv_stats(fast_cache)]
    assert admitted == [s["admitted"] for s in kv_stats(slow_cache)]
    assert all(0 < sum(a) < 80 for a in admitted), admitted  # mixed admission
    for a, b in zip(fast_cache, slow_cache):
        for x, y in zip(a.state[:7], b.state[:7]):
            np.testing.assert_allclose(np.array(x), np.array(y), atol=1e-5, rtol=0)


@needs_c
def test_c_form_gives_the_same_result_on_any_number_of_threads(monkeypatch):
    args = cache_inputs(2, 4, 150, 280, 40, [320, 300], seed=4)
    *args, key_bias = args
    results = []
    for threads in ("1", "2", "5"):
        monkeypatch.setenv("HAM_MLX_C_ATTENTION_THREADS", threads)
        results.append(np.array(cpu_attention.chunk_attention_c(*args, key_bias, 280)))
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], atol=1e-6, rtol=1e-5)


def test_c_form_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("HAM_MLX_NO_C_ATTENTION", "1")
    assert not cpu_attention.available()


@pytest.mark.parametrize("form", FORMS)
def test_one_query_as_a_view(form):
    """One query made by q[:, :, None] from [B, H, Dk]: its length-1 axis has a row stride of one
    element, which a BLAS refuses as a leading dimension."""
    q, *rest = cache_inputs(2, 2, 1, 5, 0, [5, 5])
    args = (mx.contiguous(q[:, :, 0])[:, :, None], *rest[:-1])
    got = form(*args, None, 5)
    np.testing.assert_allclose(np.array(got), np.array(compact_attention(*args)), atol=2e-6)
