"""ONNX export vs the MLX model: logits, admission decisions and final caches, for every layer
type, batch 1 and 2, a prompt fed in chunks, 64 generated tokens, and a cache that fills; and
padded batches (left and right padding through the runner), each row against MLX on its prompt
alone."""

import ham_mlx  # noqa: F401

# isort: split
import mlx.core as mx
import numpy as np
import onnx
import pytest
from conftest import LAYER_CONFIGS as CONFIGS
from conftest import make_model

from ham_mlx.export.build import build_model
from ham_mlx.export.cache_io import admitted_count, conv_history, ham_entries
from ham_mlx.export.parity import compare, compare_rows
from ham_mlx.export.runtime import OnnxModel, batch_generate


def exported(model, tmp_path, layout="compact", **kw):
    proto, _ = build_model(model, layout=layout, **kw)
    onnx.checker.check_model(proto, full_check=True)
    path = tmp_path / "model.onnx"
    onnx.save(proto, str(path))
    return OnnxModel(path)


def f32(a):
    return np.array(a.astype(mx.float32))


def assert_same_caches(model, r, atol=1e-4):
    """The ONNX caches hold what the MLX caches hold (HAM: the admitted entries per row)."""
    arrays = r["onnx_cache"].arrays()
    for io, c in zip(r["onnx_cache"].model.ios, r["mlx_cache"]):
        if io.conv is not None:
            hist = conv_history(io, arrays)
            assert (hist is None) == (c.conv is None)
            if hist is not None:
                np.testing.assert_allclose(hist, f32(c.conv), atol=atol, rtol=0)
            np.testing.assert_allclose(
                arrays[io.present("recurrent_state")], f32(c.ssm), atol=atol, rtol=0
            )
        if io.kind == "ham":
            got = ham_entries(io, arrays)
            assert got["count"] == c.admitted_counts()
            np.testing.assert_array_equal(admitted_count(io, arrays), c.admitted_counts())
            keys, values, _, scores = c.state[2:6]
            for b, n in enumerate(got["count"]):
                np.testing.assert_allclose(got["keys"][b], f32(keys[b, :, :n]), atol=atol, rtol=0)
                np.testing.assert_allclose(
                    got["values"][b], f32(values[b, :, :n]), atol=atol, rtol=0
                )
                if got["bias"][b] is not None:  # learned router: log r_s per entry
                    expected = np.log(np.maximum(f32(scores[b, :n]), 1e-6))
                    np.testing.assert_allclose(got["bias"][b], expected, atol=atol, rtol=0)
        elif io.kind == "attn":
            keys, values = c.state[:2]
            n = keys.shape[2]  # the tokens MLX keeps (all, or the last window - 1)
            seen = r["onnx_cache"].offset
            slots = np.arange(seen - n, seen) % arrays[io.present("key")].shape[2]
            np.testing.assert_allclose(
                arrays[io.present("key")][:, :, slots], f32(keys), atol=atol, rtol=0
            )
            np.testing.assert_allclose(
                arrays[io.present("value")][:, :, slots], f32(values), atol=atol, rtol=0
            )


def check(r, rows):
    assert r["rows"] == rows
    assert r["max_logit_error"] < 1e-4, r["max_logit_error"]
    assert r["flips_outside_margin"] == 0, r


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batch2_chunked_prompt_and_64_generated_tokens(name, tmp_path):
    layer_types, kw = CONFIGS[name]
    model = make_model(layer_types, **kw)
    om = exported(model, tmp_path)
    ids = np.random.default_rng(1).integers(0, 61, (2, 24))
    r = compare(model, om, ids, chunks=[5, 11, 8], n_generate=64)
    check(r, 2)
    assert r["tokens"] == 88
    assert_same_caches(model, r)
    for io in om.ios:  # admission is mixed, and rows differ: the comparison means something
        if io.kind == "ham":
            counts = r["onnx_cache"].admitted_counts(io.index)
            assert 0 < sum(counts) < 88 * len(counts), counts


@pytest.mark.parametrize("chunks", [[1] * 12, [12], [7, 5]], ids=["tokens", "whole", "7-5"])
def test_batch1_any_chunking(chunks, tmp_path):
    model = make_model(("ham", "attn", "gdn"))
    om = exported(model, tmp_path)
    ids = np.random.default_rng(2).integers(0, 61, (1, 12))
    r = compare(model, om, ids, chunks=chunks, n_generate=64)
    check(r, 1)
    assert_same_caches(model, r)


@pytest.mark.parametrize("capacity", [1, 7, 30])
def test_full_cache_rejects_like_mlx_reject_policy(capacity, tmp_path):
    """Capacity N: admitted iff score >= τ and count + CumSum(admitted) <= N, the semantics of
    the MLX model with max_kv_tokens=N, kv_policy="reject"; chunk boundaries do not matter."""
    model = make_model(("ham", "ham"), ham_threshold=0.2)
    om = exported(model, tmp_path)
    ids = np.random.default_rng(3).integers(0, 61, (2, 20))
    r = compare(model, om, ids, chunks=[3, 17], n_generate=64, max_kv_tokens=capacity)
    check(r, 2)
    assert_same_caches(model, r)
    st = r["onnx_cache"]
    stats = st.stats()
    for io in om.ios:
        assert st.admitted_counts(io.index) == [capacity, capacity]  # full, not overfull
        rejected = st.layers[io.index].rejected
        assert (rejected > 0).all(), "surprising tokens arrived after the cache filled"
        assert stats[io.index]["capacity"] == capacity
        assert stats[io.index]["rejected"] == rejected.tolist()


def test_genai_layout_matches_too(tmp_path):
    """Keys padded to the value width, GVA values grouped by q/k head (what genai allocates)."""
    model = make_model(("ham", "attn"), num_v_heads=4, ham_router="learned", ham_threshold=0.52)
    om = exported(model, tmp_path, layout="genai")
    key, value = om.ios[0].key, om.ios[0].value
    assert key == value == (2, 2 * 32)  # H heads; G * Dv columns
    ids = np.random.default_rng(4).integers(0, 61, (2, 10))
    r = compare(model, om, ids, chunks=[4, 6], n_generate=64)
    check(r, 2)
    assert_same_caches(model, r)


def test_threshold_override_is_baked_in(tmp_path):
    model = make_model(("ham",))
    low, high = exported(model, tmp_path, thresholds=[0.0]), None
    (tmp_path / "hi").mkdir()
    high = exported(model, tmp_path / "hi", thresholds=[2.5])
    ids = np.random.default_rng(5).integers(0, 61, (1, 16))
    for om, expected in ((low, 16 + 64), (high, 0)):
        assert om.thresholds in ([0.0], [2.5])
        r = compare(model, om, ids, n_generate=64)  # MLX runs with the same override
        check(r, 1)
        assert r["onnx_cache"].admitted_counts(0) == [expected]


# ---- padded batches -----------------------------------------------------------------------------
def rows_of(lengths, seed=7):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 61, n).tolist() for n in lengths]


def assert_row_caches(r, atol=1e-4):
    """Row b of the padded batch's ONNX caches holds what MLX's cache of prompt b alone holds."""
    arrays = r["onnx_cache"].arrays()
    offsets = r["onnx_cache"].offsets
    for b, mlx_cache in enumerate(r["mlx_caches"]):
        row = {k: v[b : b + 1] for k, v in arrays.items()}
        for io, c in zip(r["onnx_cache"].model.ios, mlx_cache):
            assert int(offsets[b]) == c.offset
            if io.conv is not None:
                hist = conv_history(io, row)
                if hist is not None:
                    np.testing.assert_allclose(hist, f32(c.conv), atol=atol, rtol=0)
                np.testing.assert_allclose(
                    row[io.present("recurrent_state")], f32(c.ssm), atol=atol, rtol=0
                )
            if io.kind == "ham":
                got = ham_entries(io, row)
                assert got["count"] == c.admitted_counts()
                keys, values = c.state[2:4]
                n = got["count"][0]
                np.testing.assert_allclose(got["keys"][0], f32(keys[0, :, :n]), atol=atol, rtol=0)
                np.testing.assert_allclose(
                    got["values"][0], f32(values[0, :, :n]), atol=atol, rtol=0
                )
            elif io.kind == "attn":
                keys, values = c.state[:2]
                n = keys.shape[2]
                slots = np.arange(offsets[b] - n, offsets[b]) % row[io.present("key")].shape[2]
                np.testing.assert_allclose(
                    row[io.present("key")][:, :, slots], f32(keys), atol=atol, rtol=0
                )
                np.testing.assert_allclose(
                    row[io.present("value")][:, :, slots], f32(values), atol=atol, rtol=0
                )


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_padded_rows_equal_each_prompt_alone(name, padding, tmp_path):
    """Four prompts of lengths 5, 17, 2, 11 as one padded batch, prefilled in calls of 4 tokens
    (so some calls are all pads for a row), then 64 tokens: every row's logits, admission
    decisions and final caches are those of its prompt alone on MLX (spec §7.1)."""
    layer_types, kw = CONFIGS[name]
    model = make_model(layer_types, **kw)
    om = exported(model, tmp_path)
    r = compare_rows(model, om, rows_of([5, 17, 2, 11]), padding, step=4, n_generate=64)
    check(r, 4)
    assert r["top1_agreement"] == 1.0
    assert_row_caches(r)
    total = sum(row["tokens"] for row in r["per_row"])
    for io in om.ios:
        if io.kind == "ham":  # admission is mixed: the comparison means something
            assert 0 < sum(r["onnx_cache"].admitted_counts(io.index)) < total


def test_padding_in_a_small_circular_window_cache(tmp_path):
    """Sliding-window attention whose buffer holds just the window plus one call: pads written
    around the ring never overwrite a readable entry."""
    model = make_model(("attn", "ham"), attn={"num_heads": 2, "num_kv_heads": 1, "window_size": 5})
    om = exported(model, tmp_path)
    for padding in ("right", "left"):
        r = compare_rows(model, om, rows_of([5, 17, 2, 11], seed=3), padding, step=4,
                         n_generate=64, capacity=5 - 1 + 4, max_kv_tokens=6)  # fmt: skip
        check(r, 4)
        assert_row_caches(r)


def test_batch_generate_left_and_right(tmp_path):
    """The runner's batch generation: each row's greedy tokens are its prompt's alone."""
    model = make_model(("ham", "gdn", "attn", "ham"), seed=2)
    om = exported(model, tmp_path)
    prompts = rows_of([3, 12, 7], seed=4)
    want = []
    for p in prompts:
        cache = model.make_cache()
        logits = model(mx.array([p]), cache)[:, -1]
        out = []
        for _ in range(40):
            out.append(int(mx.argmax(logits, axis=-1).item()))
            logits = model(mx.array([[out[-1]]]), cache)[:, -1]
        want.append(out)
    for padding in ("right", "left"):
        for step in (512, 5):
            got = batch_generate(om, None, prompts, max_tokens=40, padding=padding,
                                 prefill_step_size=step)  # fmt: skip
            assert got == want, (padding, step)


def test_padding_is_checked(tmp_path):
    model = make_model(("ham", "attn"))
    om = exported(model, tmp_path)
    ids = np.ones((2, 4), dtype=np.int64)
    cache = om.make_cache(2, 32)
    with pytest.raises(ValueError, match="contiguous"):
        om(ids, cache, attention_mask=np.array([[1, 0, 1, 1], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="1 \\(a real token\\) or 0"):
        om(ids, cache, attention_mask=np.array([[2, 1, 1, 1], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="attention_mask must be"):
        om(ids, cache, attention_mask=np.ones((2, 3)))
    om(ids, cache, attention_mask=np.array([[0, 0, 1, 1], [1, 1, 1, 1]]))  # left: empty row
    assert cache.offsets.tolist() == [2, 4]
    with pytest.raises(ValueError, match="only possible on an empty row"):
        om(ids, cache, attention_mask=np.array([[0, 1, 1, 1], [1, 1, 1, 1]]))
    # the MLX caches' protocol: lengths announced once, spread over several calls
    cache = om.make_cache(2, 32)
    cache.prepare(lengths=[3, 6])
    om(ids, cache)
    om(ids, cache)
    assert cache.offsets.tolist() == [3, 6]
    cache.finalize()
    with pytest.raises(ValueError, match="empty row"):
        cache.prepare(left_padding=[1, 0])
