"""The MLX extension's decode operations (ham_mlx/_mlx_ext.cpp) against their MLX twins."""

import os
import subprocess
import sys
import textwrap

import mlx.core as mx
import numpy as np
import pytest
from conftest import LAYER_CONFIGS, make_model

from ham_mlx import kv_stats
from ham_mlx import model as model_module
from ham_mlx.admission import admit
from ham_mlx.cache.kv_buffer import append_slots
from ham_mlx.layers import common
from ham_mlx.ops import fast_math, mlx_ext
from ham_mlx.ops.attention import buffer_attention, gated_output
from ham_mlx.ops.gated_delta import gated_delta_step
from ham_mlx.routers import EPS, head_surprise, key_bias, token_score

linux = sys.platform.startswith("linux")


@pytest.fixture(scope="module")
def ext():
    if not linux:
        pytest.skip("the extension is built on Linux only")
    assert mlx_ext.available(), f"the extension did not build or load: {mlx_ext.why_not()}"
    return mlx_ext.module()


def arr(x, dtype=mx.float32):
    return mx.array(np.asarray(x), dtype=dtype)


@pytest.mark.parametrize("per_row_tau", [False, True])
@pytest.mark.parametrize("cap", [None, 3])
def test_admit_matches_admit_and_append_slots(ext, per_row_tau, cap):
    rng = np.random.default_rng(0)
    B, scratch = 6, 9
    score = arr(rng.uniform(size=B))
    score[1] = mx.nan  # a NaN score is never stored
    tau = arr(rng.uniform(size=(B, 1))) if per_row_tau else arr(0.5)
    count = arr([0, 1, 2, 3, 4, 3], mx.int32)
    cap_a = None if cap is None else arr(cap, mx.int32)
    want = admit(score[:, None], tau, None, count, cap_a)  # [B, 1]
    want_slot = append_slots(count, want, arr(scratch, mx.int32))
    new_count, admitted, slot = ext.ham_admit(score, tau, count, arr([scratch], mx.int32), cap_a)
    np.testing.assert_array_equal(np.array(admitted), np.array(want[:, 0]))
    stepped = ext.ham_admit(score[:, None], tau, count, arr([scratch], mx.int32), cap_a)
    assert stepped[1].shape == (B, 1)  # admitted takes the score's shape
    np.testing.assert_array_equal(np.array(stepped[1]), np.array(want))
    np.testing.assert_array_equal(np.array(slot), np.array(want_slot[:, 0]))
    np.testing.assert_array_equal(np.array(new_count), np.array(count) + np.array(want[:, 0]))


@pytest.mark.parametrize("kind", ["cosine", "l2"])
def test_head_score_matches_head_surprise_and_token_score(ext, kind):
    rng = np.random.default_rng(6)
    B, HV, Dv = 5, 3, 40
    v_hat = arr(rng.normal(size=(B, HV, Dv)))
    v = arr(rng.normal(size=(B, Dv, HV))).swapaxes(1, 2)  # strided, as the step's slice of v
    v_hat[1, 2] = 0.0  # a zero prediction
    v_hat[2, 0, 3] = mx.nan  # a NaN surprise makes the score NaN, as MLX's min does
    want = token_score(head_surprise(v_hat, v, kind))
    got = ext.head_score(v_hat, v, kind, EPS)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-6, rtol=1e-5)
    stepped = ext.head_score(v_hat[:, None], v[:, None], kind, EPS)  # [B, 1, HV, Dv] -> [B, 1]
    np.testing.assert_array_equal(np.array(stepped), np.array(got)[:, None])
    assert np.isnan(np.array(got)[2])
    with pytest.raises(ValueError, match="kind"):
        ext.head_score(v_hat, v, "learned", EPS)


@pytest.mark.parametrize("layout", ["4d", "2d-int", "4d-transposed"])
def test_write_slot_matches_put_along_axis_and_leaves_a_held_buffer_alone(ext, layout):
    rng = np.random.default_rng(1)
    B, N, n, D = 3, 2, 5, 4
    if layout == "2d-int":
        buffer, row = arr(rng.integers(0, 99, (B, n)), mx.int32), arr([7, 8, 9], mx.int32)
    else:
        buffer, row = arr(rng.normal(size=(B, N, n, D))), arr(rng.normal(size=(B, N, D)))
        if layout == "4d-transposed":  # a strided view: copied, not written in place
            buffer = arr(rng.normal(size=(B, N, D, n))).swapaxes(2, 3)
    slot = arr([4, 0, 7], mx.int32)  # the last one is outside the buffer: nothing is written
    before = np.array(buffer)
    got = np.array(ext.write_slot(buffer, slot, row))
    want = before.copy()
    for b in range(2):
        if buffer.ndim == 4:
            want[b, :, int(slot[b])] = np.array(row[b])
        else:
            want[b, int(slot[b])] = np.array(row[b])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.array(buffer), before)  # the caller's array is unchanged
    stepped = ext.write_slot(buffer, slot, row[:, None])  # the row with its token axis
    np.testing.assert_array_equal(np.array(stepped), want)


def test_write_slot_from_a_strided_row(ext):
    rng = np.random.default_rng(7)
    buffer = arr(rng.normal(size=(2, 3, 4, 5)))
    row = arr(rng.normal(size=(2, 5, 3))).swapaxes(1, 2)  # [B, N, D] with D not innermost
    got = np.array(ext.write_slot(buffer, arr([1, 3], mx.int32), row))
    want = np.array(buffer)
    want[0, :, 1], want[1, :, 3] = np.array(row[0]), np.array(row[1])
    np.testing.assert_array_equal(got, want)


def test_write_slot_writes_in_place_when_the_buffer_is_not_held(ext):
    buffer = mx.zeros((1, 2, 8, 4))
    mx.eval(buffer)
    address = np.asarray(buffer).ctypes.data  # a transient view: numpy lets go of it below
    out = ext.write_slot(buffer, arr([3], mx.int32), mx.ones((1, 2, 4)))
    del buffer
    mx.eval(out)
    assert np.asarray(out).ctypes.data == address
    assert float(out[0, :, 3].sum()) == 8.0 and float(out.sum()) == 8.0


def attention_twin(q, keys, values, count, log_scale, sink, gate, weight, scores):
    bias = None if scores is None else key_bias(scores)
    o = buffer_attention(q, keys, values, count, log_scale, sink, bias)  # [B, HV, Dv]
    return gated_output(o[:, :, None], gate[:, None], weight, 1e-6)[:, 0]


@pytest.mark.parametrize("hv", [2, 4], ids=["mha", "gva"])
@pytest.mark.parametrize("learned", [False, True], ids=["cosine", "learned"])
@pytest.mark.parametrize("threads", [1, 2, 7])
def test_attend_matches_buffer_attention_and_gated_output(ext, hv, learned, threads):
    rng = np.random.default_rng(2)
    B, H, n, Dk, Dv = 4, 2, 200, 16, 8
    q = arr(rng.normal(size=(B, H, Dk)))
    keys = arr(rng.normal(size=(B, H, n, Dk)))
    values = arr(rng.normal(size=(B, hv, n, Dv)))
    count = arr([0, 5, 131, n], mx.int32)  # empty, short, past one block of 64, full
    log_scale, sink = arr(rng.normal(size=hv)), arr(rng.normal(size=hv))
    gate, weight = arr(rng.normal(size=(B, hv))), arr(rng.uniform(0.5, 1.5, size=Dv))
    scores = arr(rng.uniform(size=(B, n))) if learned else None
    args = (q, keys, values, count, log_scale, sink, gate, weight, scores)
    want = attention_twin(*args)
    got = ext.ham_attend(*args, 1e-6, EPS if learned else None, threads)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-5, rtol=1e-5)
    # the step's shapes, with the token axis: q [B, 1, H, Dk], gate [B, 1, HV] -> [B, 1, HV, Dv]
    stepped = ext.ham_attend(q[:, None], *args[1:6], gate[:, None], *args[7:], 1e-6,
                             EPS if learned else None, threads)  # fmt: skip
    np.testing.assert_array_equal(np.array(stepped), np.array(got)[:, None])
    assert not np.any(np.array(got)[0])  # a row with no entries attends nothing


def test_attend_keeps_large_logits_finite(ext):
    """Logits in the thousands, growing along the entries (each block raises the maximum)."""
    rng = np.random.default_rng(5)
    B, H, n, Dk, Dv = 1, 1, 300, 8, 4
    q = arr(np.ones((B, H, Dk)))
    keys = arr(np.linspace(0, 1, n)[None, None, :, None] * np.ones((B, H, n, Dk)))
    values = arr(rng.normal(size=(B, H, n, Dv)))
    args = (q, keys, values, arr([n], mx.int32), arr([6.0]), arr([0.0]), arr([[0.3]]),
            arr(np.ones(Dv)), None)  # fmt: skip
    got = np.array(ext.ham_attend(*args, 1e-6, None, 1))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, np.array(attention_twin(*args)), atol=2e-5, rtol=1e-5)


def test_attend_on_several_threads_gives_the_same_bits(ext):
    """Entries past the size where a second thread starts (2 MB), and strided inputs."""
    rng = np.random.default_rng(3)
    B, H, n, Dk, Dv = 1, 4, 1500, 64, 128
    q = arr(rng.normal(size=(B, Dk, H))).swapaxes(1, 2)
    keys = arr(rng.normal(size=(B, H, n, Dk)))
    values = arr(rng.normal(size=(B, H, Dv, n))).swapaxes(2, 3)  # copied before reading
    count = arr([n - 7], mx.int32)
    small = (arr(rng.normal(size=H)), arr(rng.normal(size=H)), arr(rng.normal(size=(B, H))),
             arr(rng.uniform(size=Dv)))  # fmt: skip
    outs = [np.array(ext.ham_attend(q, keys, values, count, *small, None, 1e-6, None, t))
            for t in (1, 2, 3)]  # fmt: skip
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    want = attention_twin(q, keys, values, count, *small, None)
    np.testing.assert_allclose(outs[0], np.array(want), atol=2e-5, rtol=1e-5)


def test_attend_on_threads_of_its_own_without_the_gemv_helper(ext):
    """Where ham_mlx's gemv helper is not loaded, the attention starts threads of its own."""
    script = textwrap.dedent(
        """
        import numpy as np, mlx.core as mx
        import ham_mlx
        from ham_mlx import _blas
        from ham_mlx.ops import fast_math, mlx_ext
        assert _blas.loaded_gemv_shim is None
        ext = mlx_ext.module()
        rng = np.random.default_rng(0)
        keys = mx.array(rng.normal(size=(1, 4, 1500, 64)), dtype=mx.float32)
        values = mx.array(rng.normal(size=(1, 4, 1500, 128)), dtype=mx.float32)
        q = mx.array(rng.normal(size=(1, 4, 64)), dtype=mx.float32)
        small = (mx.zeros((4,)), mx.zeros((4,)), mx.zeros((1, 4)), mx.ones((128,)))
        count = mx.array([1400], dtype=mx.int32)
        outs = [np.array(ext.ham_attend(q, keys, values, count, *small, None, 1e-6, None, t))
                for t in (1, 2)]
        assert np.array_equal(outs[0], outs[1])
        print("OK")
        """
    )
    env = {**os.environ, "HAM_MLX_NO_GEMV_SHIM": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "OK", done.stderr[-3000:]


@pytest.mark.parametrize("hv", [2, 4], ids=["mha", "gva"])
@pytest.mark.parametrize("threads", [1, 2, 7])
def test_gdn_step_matches_gated_delta_step(ext, hv, threads):
    """From q, k, v as the decode step holds them (strided views of one projection), three rows,
    a state big enough to be shared among threads (about 0.8 MB)."""
    rng = np.random.default_rng(5)
    B, H, Dk, Dv = 3, 2, 32, 384 // hv
    qk = arr(rng.normal(size=(B, 1, 2 * H, Dk)))
    qk = qk / mx.linalg.norm(qk, axis=-1, keepdims=True)
    q, k = qk[:, :, :H], qk[:, :, H:]
    wide = arr(rng.normal(size=(B, 1, hv * Dv + 3)))
    v = wide[..., 3:].reshape(B, 1, hv, Dv)
    g, beta = arr(-rng.uniform(0, 3, size=(B, 1, hv))), arr(rng.uniform(0, 2, size=(B, 1, hv)))
    S = arr(rng.normal(size=(B, hv, Dv, Dk)))
    o, v_hat, S2 = ext.gdn_step(S, q, k, v, g, beta, threads)
    qs, ks = q[:, 0] * Dk**-0.5, k[:, 0]
    qs, ks = mx.repeat(qs, hv // H, axis=1), mx.repeat(ks, hv // H, axis=1)
    want = gated_delta_step(qs, ks, v[:, 0], g[:, 0], beta[:, 0], S)
    for a, b in zip((o[:, 0], v_hat[:, 0], S2), want):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=2e-5, rtol=1e-5)
    assert o.shape == v.shape and v_hat.shape == v.shape and S2.shape == S.shape


@pytest.mark.parametrize("threads", [1, 2, 7])
def test_swiglu_matches_silu_times_up(ext, threads):
    """From the two halves of one product (strided rows), values out to where 2^x clamps."""
    rng = np.random.default_rng(6)
    both = arr(rng.normal(scale=30.0, size=(3, 70, 2 * 520)))
    both[0, 0, :4] = arr([-200.0, 200.0, 0.0, -0.0])
    gate, up = mx.split(both, 2, axis=-1)
    got = ext.swiglu(gate, up, threads)
    want = fast_math.silu(gate) * up
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=2e-6, atol=1e-6)
    assert got.shape == gate.shape


def test_swiglu_leaves_mlx_threads_their_floating_point_mode(ext):
    """Its parts flush denormals while they run (MLX's own CPU thread runs one of them); MLX's
    later operations on that thread still make denormals."""
    gate = mx.full((64, 4096), -90.0)  # SiLU near 2^-126: denormal candidates
    mx.eval(ext.swiglu(gate, mx.ones_like(gate), 2))
    tiny = mx.array([1e-38]) / 16.0
    assert float(tiny[0]) != 0.0


def test_a_cached_prefill_takes_swiglu_and_matches_the_mlx_form(ext, monkeypatch):
    model = make_model(("gdn", "ham"))
    ids = mx.array(np.random.default_rng(8).integers(0, 61, (2, 40)))
    calls = []

    class Spy:
        def __getattr__(self, key):
            calls.append(key)
            return getattr(ext, key)

    monkeypatch.setattr(mlx_ext, "module", lambda: Spy())
    got = model(ids, model.make_cache())
    assert "swiglu" in calls
    calls.clear()
    monkeypatch.setattr(model_module, "SWIGLU_MIN_TOKENS", 10**9)
    want = model(ids, model.make_cache())
    assert "swiglu" not in calls
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-4, rtol=0)


def test_bad_shapes_and_dtypes_are_refused_when_the_graph_is_built(ext):
    i = mx.zeros((2,), dtype=mx.int32)
    with pytest.raises(ValueError, match="write_slot: row"):
        ext.write_slot(mx.zeros((2, 3, 4, 5)), i, mx.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="dtypes differ"):
        ext.write_slot(mx.zeros((2, 4)), i, i)
    with pytest.raises(ValueError, match="ham_admit"):
        ext.ham_admit(mx.zeros((3,)), mx.zeros((1,)), i, mx.zeros((1,), dtype=mx.int32), None)
    f = mx.zeros((2,))
    with pytest.raises(ValueError, match="q must be"):
        ext.ham_attend(mx.zeros((2, 2, 3)), mx.zeros((2, 2, 5, 4)), mx.zeros((2, 2, 5, 4)), i, f,
                       f, mx.zeros((2, 2)), mx.zeros((4,)), None, 1e-6, None, 1)  # fmt: skip
    S, q, v = mx.zeros((2, 4, 8, 16)), mx.zeros((2, 1, 2, 16)), mx.zeros((2, 1, 4, 8))
    gb = mx.zeros((2, 1, 4))
    with pytest.raises(ValueError, match="gdn_step: v must be"):
        ext.gdn_step(S, q, q, mx.zeros((2, 1, 4, 9)), gb, gb, 1)
    with pytest.raises(ValueError, match="multiple of q/k heads"):
        ext.gdn_step(S, mx.zeros((2, 1, 3, 16)), mx.zeros((2, 1, 3, 16)), v, gb, gb, 1)
    with pytest.raises(ValueError, match="float32"):
        ext.gdn_step(S.astype(mx.float16), q, q, v, gb, gb, 1)
    with pytest.raises(ValueError, match="swiglu: gate and up"):
        ext.swiglu(mx.zeros((2, 4)), mx.zeros((2, 5)), 1)


GDN_GVA_NEGEIG = (("gdn",), {"num_v_heads": 4, "allow_neg_eigval": True})


def decode_logits(model, ids, prompt, **cache_kw):
    cache = model.make_cache(**cache_kw)
    out = [model(ids[:, :prompt], cache)[:, -1:]]
    out += [model(ids[:, t : t + 1], cache) for t in range(prompt, ids.shape[1])]
    mx.eval(out)
    return np.array(mx.concatenate(out, axis=1)), [s["admitted"] for s in kv_stats(cache)]


@pytest.mark.parametrize(
    "name,controls",
    [(n, {}) for n in LAYER_CONFIGS if n.startswith("ham") and "conv1" not in n]  # Kc = 1: general
    + [("gdn", {}), ("gdn-gva-negeig", {})]
    + [
        ("ham-cosine", {"max_kv_tokens": 5, "kv_policy": "reject"}),
        ("ham-cosine", {"kv_budget": 0.3}),
    ],  # fmt: skip
)
def test_decode_with_the_extension_matches_decode_without(ext, monkeypatch, name, controls):
    layer_types, kw = LAYER_CONFIGS.get(name, GDN_GVA_NEGEIG)
    model = make_model(layer_types + ("gdn",) + layer_types, **kw)
    ids = mx.array(np.random.default_rng(4).integers(0, 61, (2, 24)))
    calls = []

    class Spy:  # records the operations the traced steps take from the extension
        def __getattr__(self, key):
            calls.append(key)
            return getattr(ext, key)

    monkeypatch.setattr(mlx_ext, "module", lambda: Spy())
    results, used = [], []
    for off in ("1", "0"):
        monkeypatch.setenv("HAM_MLX_NO_MLX_EXT", off)
        monkeypatch.setattr(common, "_COMPILED", {})
        calls.clear()
        results.append(decode_logits(model, ids, 6, **controls))
        used.append(sorted(set(calls) & {"gdn_step", "ham_attend"}))
    ops = ["gdn_step"] + (["ham_attend"] if name.startswith("ham") else [])
    assert used == [[], ops], "only the second decode uses the extension"
    (want, want_counts), (got, got_counts) = results
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert got_counts == want_counts


@pytest.mark.parametrize("compiler", ["system", "failing"])
def test_a_fresh_build_and_a_failed_one(tmp_path, compiler):
    """Built from nothing into an empty folder, the extension loads and serves decoding; a build
    that fails leaves `available()` false with the reason, and decoding keeps MLX's operations."""
    script = textwrap.dedent(
        """
        import mlx.core as mx
        import ham_mlx
        from ham_mlx.ops import fast_math, mlx_ext
        from ham_mlx import Model
        from ham_mlx.config import ModelArgs
        print(mlx_ext.available())
        print(mlx_ext.why_not())
        args = ModelArgs(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_heads=2,
                         head_dim=8, layer_types=["ham"], ham_threshold=0.0)
        model = Model(args)
        cache = model.make_cache()
        out = [model(mx.array([[1, 2, 3]]), cache)] + [model(mx.array([[4]]), cache)]
        mx.eval(out)
        print("decoded", cache[0].admitted_counts())
        """
    )
    env = {**os.environ, "HAM_MLX_EXT_DIR": str(tmp_path)}
    env.pop("HAM_MLX_NO_MLX_EXT", None)
    if compiler == "failing":
        env["CXX"] = "/bin/false"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "decoded [4]"  # τ = 0 stores every token
    built = list(tmp_path.glob("*/_mlx_ext*"))
    if compiler == "system" and linux:
        assert lines[:2] == ["True", "None"]
        assert len(built) == 1, "the build is kept in the folder"
    else:
        assert lines[0] == "False" and not built
        assert "compiler failed" in lines[1] if linux else lines[1] != "None"
