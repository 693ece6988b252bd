"""The one-token decode fast path (compiled fixed-shape step) against its general-path twin."""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import LAYER_CONFIGS, make_model

from ham_mlx import kv_stats
from ham_mlx.cache import HAMCache
from ham_mlx.layers import common
from ham_mlx.ops.attention import buffer_attention, compact_attention
from ham_mlx.ops.gated_delta import gated_delta_sequential, gated_delta_step

MODES = {"general": (False, True), "fast": (True, False), "fast-compiled": (True, True)}
HAM_CONFIGS = [n for n, (types, _) in LAYER_CONFIGS.items() if "ham" in types or "gdn" in types]


@pytest.fixture
def mode():
    saved = common.FAST_DECODE, common.COMPILE

    def set_mode(name):
        common.FAST_DECODE, common.COMPILE = MODES[name]

    yield set_mode
    common.FAST_DECODE, common.COMPILE = saved


@pytest.mark.parametrize("hv", [2, 4], ids=["mha", "gva"])
def test_gated_delta_step_matches_sequential(hv):
    rng = np.random.default_rng(0)
    B, H, Dk, Dv = 2, 2, 16, 8
    q = mx.array(rng.normal(size=(B, 1, H, Dk)), dtype=mx.float32) * Dk**-0.5
    k = mx.array(rng.normal(size=(B, 1, H, Dk)), dtype=mx.float32)
    k = k / mx.linalg.norm(k, axis=-1, keepdims=True)
    v = mx.array(rng.normal(size=(B, 1, hv, Dv)), dtype=mx.float32)
    g = -mx.array(rng.uniform(0.01, 1.0, size=(B, 1, hv)), dtype=mx.float32)
    beta = mx.array(rng.uniform(0, 2, size=(B, 1, hv)), dtype=mx.float32)
    S = mx.array(rng.normal(size=(B, hv, Dv, Dk)), dtype=mx.float32)
    ref = gated_delta_sequential(q, k, v, g, beta, S)
    qr, kr = (mx.repeat(x[:, 0], hv // H, axis=1) for x in (q, k))
    o, v_hat, S1 = gated_delta_step(qr, kr, v[:, 0], g[:, 0], beta[:, 0], S)
    for got, want in zip((o, v_hat, S1), (ref[0][:, 0], ref[1][:, 0], ref[2])):
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5, rtol=0)


@pytest.mark.parametrize("hv", [2, 4], ids=["mha", "gva"])
@pytest.mark.parametrize("bias", [False, True], ids=["cosine", "learned"])
def test_buffer_attention_matches_compact_attention(hv, bias):
    rng = np.random.default_rng(1)
    B, H, n, Dk, Dv = 3, 2, 12, 16, 8
    q = mx.array(rng.normal(size=(B, H, Dk)), dtype=mx.float32)
    keys = mx.array(rng.normal(size=(B, H, n, Dk)), dtype=mx.float32)
    values = mx.array(rng.normal(size=(B, hv, n, Dv)), dtype=mx.float32)
    counts = mx.array([0, 5, 12], dtype=mx.int32)  # an empty row, a partial one, a full one
    log_scale = mx.array(rng.normal(size=(hv,)), dtype=mx.float32)
    sink = mx.array(rng.normal(size=(hv,)), dtype=mx.float32)
    key_bias = mx.array(rng.normal(size=(B, n)), dtype=mx.float32) if bias else None
    got = buffer_attention(q, keys, values, counts, log_scale, sink, key_bias)
    positions = mx.broadcast_to(mx.arange(n, dtype=mx.int32), (B, n))
    want = compact_attention(q[:, :, None], keys, values, counts, positions, mx.array([n]),
                             log_scale, sink, key_bias)[:, :, 0]  # fmt: skip
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5, rtol=0)
    assert not np.array(got[0]).any()  # nothing admitted: exactly zero (the sink)


def decode(model, ids, prompt, **cache_kw):
    """Prefill `prompt` tokens, then decode the rest one by one; logits [B, T, V] and caches."""
    cache = model.make_cache(**cache_kw)
    out = [model(ids[:, :prompt], cache)]
    for t in range(prompt, ids.shape[1]):
        out.append(model(ids[:, t : t + 1], cache))
    logits = mx.concatenate(out, axis=1)
    mx.eval(logits)
    return logits, cache


def same_json(x: str, y: str, atol: float) -> bool:
    """Two JSON strings equal, numbers within atol (kv_budget's recent scores)."""

    def close(a, b):
        if isinstance(a, dict):
            same_keys = isinstance(b, dict) and a.keys() == b.keys()
            return same_keys and all(close(a[k], b[k]) for k in a)
        if isinstance(a, list):
            return isinstance(b, list) and len(a) == len(b) and all(map(close, a, b))
        if isinstance(a, float) or isinstance(b, float):
            return abs(a - b) <= atol
        return a == b

    return close(json.loads(x), json.loads(y))


def states(cache):
    return [[np.array(a) if isinstance(a, mx.array) else a for a in c.state] for c in cache]


def check_same(model, ids, prompt, mode, **cache_kw):
    mode("general")
    ref, ref_cache = decode(model, ids, prompt, **cache_kw)
    for name in ("fast", "fast-compiled"):
        mode(name)
        got, cache = decode(model, ids, prompt, **cache_kw)
        np.testing.assert_allclose(np.array(got), np.array(ref), atol=1e-4, rtol=0, err_msg=name)
        assert [s["admitted"] for s in kv_stats(cache)] == [
            s["admitted"] for s in kv_stats(ref_cache)
        ]
        for a, b in zip(states(cache), states(ref_cache)):
            for x, y in zip(a, b):
                assert type(x) is type(y)
                if isinstance(x, np.ndarray):
                    np.testing.assert_allclose(x, y, atol=1e-4, rtol=0, err_msg=name)
                elif isinstance(x, str):
                    assert same_json(x, y, 1e-4)
                else:
                    assert x == y
    return ref_cache


@pytest.mark.parametrize("name", HAM_CONFIGS)
def test_fast_decode_matches_general_path(name, mode):
    layer_types, kw = LAYER_CONFIGS[name]
    model = make_model(layer_types, **kw)
    ids = mx.array(np.random.default_rng(2).integers(0, 61, (2, 20)))
    check_same(model, ids, 4, mode)
    check_same(model, ids, 1, mode)  # decoding from an empty cache


@pytest.mark.parametrize(
    "controls",
    [
        {"threshold": 0.5},
        {"kv_budget": 0.3},
        {"max_kv_tokens": 5, "kv_policy": "reject"},
        {"max_kv_tokens": 5, "kv_policy": "evict"},
    ],
    ids=["threshold", "budget", "reject", "evict"],
)
def test_fast_decode_with_controls(controls, mode):
    model = make_model(("ham", "gdn", "attn", "ham"))
    ids = mx.array(np.random.default_rng(3).integers(0, 61, (2, 24)))
    cache = check_same(model, ids, 6, mode, **controls)
    if "max_kv_tokens" in controls:
        assert max(max(s["admitted"]) for s in kv_stats(cache) if s["type"] == "ham") <= 5


def test_fast_decode_buffer_growth(mode):
    """A small buffer step makes the compact buffer grow (and the compiled step retrace) while
    decoding; rows admit different counts."""
    model = make_model(("ham",), ham_threshold=0.2)
    layer = model.ham_layers[0]
    ids = mx.array(np.random.default_rng(4).integers(0, 61, (2, 30)))
    results = []
    for name in ("general", "fast-compiled"):
        mode(name)
        cache = HAMCache(threshold=0.2, step=4)
        h = model.model.embeddings(ids)
        out = [layer(h[:, t : t + 1], cache) for t in range(ids.shape[1])]
        mx.eval(out)
        results.append((mx.concatenate(out, axis=1), cache))
        assert cache.keys.shape[2] > 8
    (a, ca), (b, cb) = results
    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4, rtol=0)
    assert ca.admitted_counts() == cb.admitted_counts()
    for x, y in zip(ca.state[2:8], cb.state[2:8]):
        np.testing.assert_allclose(np.array(x), np.array(y), atol=1e-5, rtol=0)


@pytest.mark.parametrize("router", ["cosine", "learned"])
def test_quantized_layers_take_the_general_path(router):
    import mlx.nn as nn

    model = make_model(("ham", "gdn"), ham_router=router, hidden_size=64, ham_router_hidden=64)
    cache = model.make_cache()
    x = mx.zeros((1, 1, 64))
    rows = [c.call_rows(1, 1) for c in cache]
    assert all(layer.attn.fast_decode(x, c, r) for layer, c, r in zip(model.layers, cache, rows))
    nn.quantize(model, group_size=32, bits=8)
    assert not any(
        layer.attn.fast_decode(x, c, r) for layer, c, r in zip(model.layers, cache, rows)
    )
    tokens = mx.array([[1, 5, 9, 2, 7]])
    full = model(tokens)
    steps = [model(tokens[:, i : i + 1], cache) for i in range(tokens.shape[1])]
    assert np.allclose(np.array(mx.concatenate(steps, axis=1)), np.array(full), atol=1e-4)


def test_decode_runs_each_block_as_one_step_unless_its_mlp_is_quantized(mode):
    import mlx.nn as nn

    mode("fast-compiled")
    model = make_model(("ham", "gdn", "attn"), hidden_size=64)
    cache = model.make_cache()
    x = mx.zeros((1, 1, 64))
    plans = [layer.decode_plan(x, c, None) for layer, c in zip(model.layers, cache)]
    assert [p is not None and p.key[0] for p in plans] == ["block", "block", False]
    assert [p.key[1][0] for p in plans[:2]] == ["ham", "gdn"]
    nn.quantize(model, group_size=32, bits=8, class_predicate=lambda path, m: ".mlp." in path)
    cache = model.make_cache()
    assert all(layer.decode_plan(x, c, None) is None for layer, c in zip(model.layers, cache))
    assert all(
        layer.attn.decode_plan(x, c) is not None for layer, c in zip(model.layers[:2], cache)
    )
    tokens = mx.array([[1, 5, 9, 2, 7]])
    full = model(tokens)  # the quantized MLPs, the mixers' own steps
    steps = [model(tokens[:, i : i + 1], cache) for i in range(tokens.shape[1])]
    assert np.allclose(np.array(mx.concatenate(steps, axis=1)), np.array(full), atol=1e-4)


def test_decode_stacks_projections_without_keeping_a_copy_and_follows_new_weights(mode):
    from mlx.utils import tree_flatten

    mode("fast-compiled")
    model = make_model(("gdn", "ham"), hidden_size=256)
    tokens = mx.array([[1, 5, 9, 2, 7]])
    full = model(tokens)

    def decoded():
        cache = model.make_cache()
        return mx.concatenate([model(tokens[:, i : i + 1], cache) for i in range(5)], axis=1)

    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    mx.eval(full)
    mx.clear_cache()
    memory = mx.get_active_memory()
    np.testing.assert_allclose(np.array(decoded()), np.array(full), atol=1e-4, rtol=0)
    mx.clear_cache()
    stacked = sum(
        s.value.nbytes
        for layer in model.layers
        for s in (layer.attn._in_stack, layer.mlp._gate_up)  # the stacks the decode step built
    )
    assert mx.get_active_memory() - memory < stacked / 4  # the weights now view the stacks
    after = dict(tree_flatten(model.parameters()))
    assert after.keys() == before.keys()
    for k, v in before.items():
        np.testing.assert_array_equal(np.array(after[k]), v, err_msg=k)
    # new weights (a checkpoint loaded, a training step): the stacks follow them
    rng = np.random.default_rng(5)
    names = [k for k in before if k.endswith(("q_proj.weight", "up_proj.weight"))]
    new = [(k, mx.array(rng.normal(size=before[k].shape).astype(np.float32) * 0.05)) for k in names]
    model.load_weights(new, strict=False)
    full = model(tokens)
    np.testing.assert_allclose(np.array(decoded()), np.array(full), atol=1e-4, rtol=0)
