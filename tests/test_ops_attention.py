"""Attention over admitted tokens with a sink, against a float64 reference."""

import ham_mlx  # noqa: F401  (preloads OpenBLAS before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np
import pytest

from ham_mlx.ops.attention import (
    admitted_attention,
    attention_reference,
    cache_attention,
    masked_attention,
)

B, N, DK, DV = 2, 3, 8, 16


def make_inputs(Tq, Tk, seed=0, heads=N):
    """Random (q, k, v, log_scale, sink, key_bias) with unit-norm q and k, as the HAM layer uses."""
    mx.random.seed(seed)
    q = mx.random.normal((B, heads, Tq, DK))
    k = mx.random.normal((B, heads, Tk, DK))
    q = q / mx.linalg.norm(q, axis=-1, keepdims=True)
    k = k / mx.linalg.norm(k, axis=-1, keepdims=True)
    v = mx.random.normal((B, heads, Tk, DV))
    log_scale = mx.log(mx.sqrt(mx.array(DK, mx.float32))) + 0.3 * mx.random.normal((heads,))
    sink = mx.random.normal((heads,))
    key_bias = mx.log(mx.random.uniform(1e-3, 1.0, (B, Tk)))  # log r_s of the learned router
    return q, k, v, log_scale, sink, key_bias


def random_mask(Tq, Tk, seed=1, empty_rows=(0,)):
    mask = np.random.default_rng(seed).random((B, N, Tq, Tk)) < 0.5
    mask[:, :, list(empty_rows)] = False  # queries with no allowed key
    return mx.array(mask)


def assert_close(out, ref, atol=1e-5):
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), ref, atol=atol, rtol=atol)


@pytest.mark.parametrize("use_bias", [False, True], ids=["bool-mask", "router-bias"])
def test_masked_attention_matches_reference(use_bias):
    q, k, v, log_scale, sink, key_bias = make_inputs(6, 9)
    key_bias = key_bias if use_bias else None
    mask = random_mask(6, 9)
    out = masked_attention(q, k, v, mask, log_scale, sink, key_bias)
    assert out.shape == (B, N, 6, DV) and out.dtype == mx.float32
    assert_close(out, attention_reference(q, k, v, mask, log_scale, sink, key_bias))
    assert bool(mx.all(out[:, :, 0] == 0.0))  # exactly zero, not just small


def test_gva_expanded_heads():
    """The caller repeat-interleaves 2 q/k heads to 4 value heads."""
    q, k, _, _, _, key_bias = make_inputs(5, 5, seed=2, heads=2)
    _, _, v, log_scale, sink, _ = make_inputs(5, 5, seed=3, heads=4)
    q, k = mx.repeat(q, 2, axis=1), mx.repeat(k, 2, axis=1)
    mask = mx.tril(mx.ones((5, 5), dtype=mx.bool_))
    out = masked_attention(q, k, v, mask, log_scale, sink, key_bias)
    assert_close(out, attention_reference(q, k, v, mask, log_scale, sink, key_bias))


def admitted_mask(admitted, Tq, offset):
    """`[B, 1, Tq, Tk]` by definition: query i may see key s iff s <= offset + i and admitted."""
    admitted = np.array(admitted)
    mask = np.zeros((B, 1, Tq, admitted.shape[1]), dtype=bool)
    for b in range(B):
        for i in range(Tq):
            for s in range(admitted.shape[1]):
                mask[b, 0, i, s] = s <= offset + i and admitted[b, s]
    return mask


@pytest.mark.parametrize("use_bias", [False, True], ids=["cosine", "learned"])
@pytest.mark.parametrize(
    "Tq, offset", [(7, 0), (4, 5), (1, 8)], ids=["prefill", "with-cache-prefix", "decode"]
)
def test_admitted_attention(Tq, offset, use_bias):
    Tk = offset + Tq
    q, k, v, log_scale, sink, key_bias = make_inputs(Tq, Tk, seed=4)
    key_bias = key_bias if use_bias else None
    admitted = mx.array(np.random.default_rng(5).random((B, Tk)) < 0.6)
    admitted[0, 0] = False  # so the first query of row 0 (in prefill) sees nothing
    out = admitted_attention(q, k, v, admitted, log_scale, sink, key_bias, offset=offset)
    mask = admitted_mask(admitted, Tq, offset)
    assert_close(out, attention_reference(q, k, v, mask, log_scale, sink, key_bias))


@pytest.mark.parametrize("Tq, offset", [(512, 0), (256, 40)], ids=["training", "with-prefix"])
def test_causal_blocks_match_one_masked_product(Tq, offset):
    """split=True (queries halved into causal blocks down to SPLIT_MIN, as on the CPU fast path)
    against one masked product over all keys: outputs and gradients, with the router's bias."""
    Tk = offset + Tq
    q, k, v, log_scale, sink, key_bias = make_inputs(Tq, Tk, seed=11)
    admitted = mx.array(np.random.default_rng(12).random((B, Tk)) < 0.3)

    def run(split):
        def f(q, k, v, key_bias):
            out = admitted_attention(q, k, v, admitted, log_scale, sink, key_bias, offset, split)
            return (out * out).sum(), out

        (_, out), grads = mx.value_and_grad(f, argnums=(0, 1, 2, 3))(q, k, v, key_bias)
        return out, grads

    (out_b, grads_b), (out_1, grads_1) = run(True), run(False)
    np.testing.assert_allclose(np.array(out_b), np.array(out_1), atol=2e-6, rtol=1e-5)
    for a, b in zip(grads_b, grads_1):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=2e-5, rtol=1e-4)
    mask = admitted_mask(admitted, Tq, offset)
    assert_close(out_b, attention_reference(q, k, v, mask, log_scale, sink, key_bias))


def test_empty_admitted_set_gives_zero():
    q, k, v, log_scale, sink, key_bias = make_inputs(6, 6, seed=6)
    admitted = mx.zeros((B, 6), dtype=mx.bool_)
    for bias in (None, key_bias):
        out = admitted_attention(q, k, v, admitted, log_scale, sink, bias)
        assert bool(mx.all(out == 0.0))


@pytest.mark.parametrize("Tq", [1, 3], ids=["decode", "multi-token"])
def test_cache_attention(Tq):
    C = 6
    q, k, v, log_scale, sink, _ = make_inputs(Tq, C, seed=7)
    counts = mx.array([0, C])  # an empty row and a full one
    out = cache_attention(q, k, v, counts, log_scale, sink)
    mask = np.arange(C)[None, None, None, :] < np.array(counts)[:, None, None, None]
    assert_close(out, attention_reference(q, k, v, mask, log_scale, sink))
    assert bool(mx.all(out[0] == 0.0))
    counts = mx.array([3, 1])
    out = cache_attention(q, k, v, counts, log_scale, sink)
    mask = np.arange(C)[None, None, None, :] < np.array(counts)[:, None, None, None]
    assert_close(out, attention_reference(q, k, v, mask, log_scale, sink))


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("use_bias", [False, True], ids=["bool-mask", "router-bias"])
def test_half_precision(dtype, use_bias):
    q, k, v, log_scale, sink, key_bias = make_inputs(6, 9, seed=8)
    key_bias = key_bias if use_bias else None
    mask = random_mask(6, 9, seed=9, empty_rows=(0, 3))
    out = masked_attention(
        q.astype(dtype), k.astype(dtype), v.astype(dtype), mask, log_scale, sink, key_bias
    )
    assert out.dtype == dtype
    assert bool(mx.all(out[:, :, [0, 3]] == 0.0))
    assert_close(out, attention_reference(q, k, v, mask, log_scale, sink, key_bias), atol=5e-2)


def test_fully_masked_rows_with_sinks_are_exactly_zero_in_mlx():
    """The MLX behaviour masked_attention relies on: a sink turns a fully masked row into exact 0
    (without a sink the row would be mean(v)); an additive -inf mask does not produce NaN."""
    q, k, v, _, sink, _ = make_inputs(4, 5, seed=10)
    mask = random_mask(4, 5, seed=11, empty_rows=(1,))
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask, sinks=sink)
    assert bool(mx.all(out[:, :, 1] == 0.0))
    additive = mx.where(mask, 0.0, -mx.inf)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=additive, sinks=sink)
    assert not bool(mx.any(mx.isnan(out)))
    assert bool(mx.all(out[:, :, 1] == 0.0))


def plain_attention(q, k, v, mask, log_scale, sink, key_bias):
    """The same math in plain differentiable mx ops: explicit logits and a sink column."""
    logits = mx.exp(log_scale)[:, None, None] * (q @ k.swapaxes(-1, -2)) + key_bias[:, None, None]
    logits = mx.where(mask, logits, -1e30)
    sinks = mx.broadcast_to(sink[:, None, None], logits.shape[:-1] + (1,))
    p = mx.softmax(mx.concatenate([logits, sinks], axis=-1), axis=-1)[..., :-1]
    return p @ v


def test_gradients_match_plain_ops():
    """The router's gradient path (key_bias), the sink and the scale all get the right gradient."""
    inputs = make_inputs(5, 7, seed=12)
    mask = random_mask(5, 7, seed=13)
    w = mx.random.normal((B, N, 5, DV))

    def loss(f):
        return lambda q, k, v, s, z, kb: (f(q, k, v, mask, s, z, kb) * w).sum()

    argnums = list(range(6))
    grads = mx.grad(loss(masked_attention), argnums=argnums)(*inputs)
    expected = mx.grad(loss(plain_attention), argnums=argnums)(*inputs)
    for a, b in zip(grads, expected):
        assert bool(mx.all(mx.isfinite(a)))
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("use_bias", [False, True], ids=["bool-mask", "router-bias"])
def test_cpu_softmax_form_matches_mlx_sdpa(use_bias, monkeypatch):
    """On the CPU, masked_attention writes the softmax out with fast_math.exp; its twin is
    mx.fast.scaled_dot_product_attention (HAM_MLX_NO_FAST_MATH=1). Outputs and gradients."""
    inputs = list(make_inputs(7, 7, seed=14))
    if not use_bias:
        inputs[5] = None
    mask = random_mask(7, 7, seed=15, empty_rows=(0, 4)) & mx.tril(mx.ones((7, 7), mx.bool_))
    w = mx.random.normal((B, N, 7, DV))
    argnums = [0, 1, 2, 3, 4] + ([5] if use_bias else [])

    def run():
        def loss(*a):
            full = list(a) + ([] if use_bias else [None])
            q, k, v, s, z, kb = full
            return (masked_attention(q, k, v, mask, s, z, kb) * w).sum()

        out = masked_attention(*inputs[:3], mask, *inputs[3:])
        args = inputs if use_bias else inputs[:5]
        return out, mx.grad(loss, argnums=argnums)(*args)

    fast_out, fast_grads = run()
    monkeypatch.setenv("HAM_MLX_NO_FAST_MATH", "1")
    twin_out, twin_grads = run()
    assert bool(mx.all(fast_out[:, :, [0, 4]] == 0.0))
    np.testing.assert_allclose(np.array(fast_out), np.array(twin_out), atol=2e-6, rtol=1e-5)
    for a, b in zip(fast_grads, twin_grads):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=2e-6, rtol=1e-4)
