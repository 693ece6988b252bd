"""The Metal emulation harness (tests/metal_emulation) on small kernels with known answers: MLX's
generated source compiled with g++ and run on the CPU, threadgroups and simdgroups included."""

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from metal_emulation import (
    MetalEmulationError,
    from_bfloat16_bits,
    gxx_available,
    kernel_source,
    run_kernel,
    to_bfloat16_bits,
)

pytestmark = pytest.mark.skipif(
    not gxx_available(), reason="g++ not found: the Metal emulation compiles kernels with g++"
)


def metal_kernel(name, inputs, outputs, source, **kw):
    return mx.fast.metal_kernel(
        name=name, input_names=inputs, output_names=outputs, source=source, **kw
    )


def emulate(kernel, inputs, outputs, grid, threadgroup, **kw):
    """Capture `kernel`'s source for these inputs (numpy arrays, mx arrays or scalars, in
    input_names order) and run it. outputs: name -> (shape, mx dtype); bf16 comes back as fp32."""
    mx_inputs = [
        v if isinstance(v, (int, float, mx.array)) else mx.array(v) for v in inputs.values()
    ]
    src = kernel_source(
        kernel, inputs=mx_inputs, grid=grid, threadgroup=threadgroup,
        output_shapes=[s for s, _ in outputs.values()],
        output_dtypes=[d for _, d in outputs.values()], **kw,
    )  # fmt: skip
    np_inputs = {
        name: np.array(v.view(mx.uint16) if v.dtype == mx.bfloat16 else v)
        if isinstance(v, mx.array) else v
        for name, v in inputs.items()
    }  # fmt: skip
    np_outputs = {
        name: (shape, np.float32 if d == mx.bfloat16 else np.array(mx.zeros(1, d)).dtype)
        for name, (shape, d) in outputs.items()
    }
    init = kw.get("init_value")
    out, counters = run_kernel(src, np_inputs, np_outputs, grid, threadgroup, init_value=init)
    return src, out, counters


ELEMENTWISE = """
  uint i = thread_position_in_grid.x;
  if (i < a_shape[0]) {
    out[i] = a[i] * T(n) + T(N);
  }
"""


def test_elementwise_signature_and_scalar():
    k = metal_kernel("ew", ["a", "n"], ["out"], ELEMENTWISE)
    a = np.arange(10, dtype=np.float32)
    tmpl = [("T", mx.float32), ("N", 4)]
    src, out, counters = emulate(
        k, {"a": a, "n": 3}, {"out": (a.shape, mx.float32)}, (16, 1, 1), (8, 1, 1), template=tmpl
    )
    assert src.function.startswith("custom_kernel_ew")
    assert src.template_params == ("T", "N") and src.template_args == ("float", "4")
    sig = [(p.name, p.type, p.address_space, p.pointer, p.const, p.buffer, p.attribute)
           for p in src.params]  # fmt: skip
    assert sig == [
        ("a", "float", "device", True, True, 0, None),
        ("a_shape", "int", "constant", True, True, 1, None),
        ("n", "int32_t", "constant", False, True, 2, None),
        ("out", "float", "device", True, False, 3, None),
        ("thread_position_in_grid", "uint3", None, False, False, None, "thread_position_in_grid"),
    ]
    assert [p.name for p in src.params if p.is_output] == ["out"]
    np.testing.assert_array_equal(out["out"], a * 3 + 4)
    assert counters == {}


THREADGROUP_SUM = """
  threadgroup float buf[TG];
  uint l = thread_position_in_threadgroup.x;
  buf[l] = x[thread_position_in_grid.x];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint s = TG / 2; s > 0; s >>= 1) {
    if (l < s) {
      buf[l] += buf[l + s];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  if (l == 0) {
    out[threadgroup_position_in_grid.x] = buf[0];
  }
"""


def test_threadgroup_memory_reduction_with_barriers():
    k = metal_kernel("tg_sum", ["x"], ["out"], THREADGROUP_SUM)
    x = np.random.default_rng(0).integers(-50, 50, 256).astype(np.float32)
    _, out, _ = emulate(
        k, {"x": x}, {"out": ((4,), mx.float32)}, (256, 1, 1), (64, 1, 1), template=[("TG", 64)]
    )
    np.testing.assert_array_equal(out["out"], x.reshape(4, 64).sum(axis=1))


SIMD_OPS = """
  uint t = thread_index_in_threadgroup;
  uint lane = thread_index_in_simdgroup;
  float v = x[t];
  sum[t] = simd_sum(r[t]);
  mx[t] = simd_max(v);
  mn[t] = simd_min(v);
  prefix[t] = simd_prefix_exclusive_sum(v);
  bcast[t] = simd_broadcast(v, 5);
  shuf[t] = simd_shuffle(v, 31 - lane);
  down[t] = simd_shuffle_down(v, 1);
  xr[t] = simd_shuffle_xor(v, 3);
  isum[t] = simd_sum(int(t));
  ids[t] = simdgroup_index_in_threadgroup * 100 + lane;
"""


def test_simd_group_functions_on_two_simdgroups():
    names = ["sum", "mx", "mn", "prefix", "bcast", "shuf", "down", "xr", "isum", "ids"]
    k = metal_kernel("simd_ops", ["x", "r"], names, SIMD_OPS)
    rng = np.random.default_rng(1)
    x = rng.integers(-20, 20, 64).astype(np.float32)
    r = rng.normal(size=64).astype(np.float32)
    dtypes = [mx.float32] * 8 + [mx.int32, mx.uint32]
    outputs = {n: ((64,), d) for n, d in zip(names, dtypes)}
    _, out, _ = emulate(k, {"x": x, "r": r}, outputs, (64, 1, 1), (64, 1, 1))
    xs, lanes = x.reshape(2, 32), np.arange(32)
    tree = r.reshape(2, 32)  # the ascending butterfly (xor 1, 2, 4, 8, 16), pairwise in fp32
    while tree.shape[1] > 1:
        tree = tree[:, 0::2] + tree[:, 1::2]
    per_group = lambda a: np.repeat(a.reshape(2, 1), 32, axis=1)  # noqa: E731
    expect = {
        "sum": per_group(tree),
        "mx": per_group(xs.max(axis=1)),
        "mn": per_group(xs.min(axis=1)),
        "prefix": np.cumsum(xs, axis=1) - xs,
        "bcast": per_group(xs[:, 5]),
        "shuf": xs[:, 31 - lanes],
        "down": np.concatenate([xs[:, 1:], xs[:, 31:]], axis=1),  # lane 31 keeps its value
        "xr": xs[:, lanes ^ 3],
        "isum": per_group(np.arange(64).reshape(2, 32).sum(axis=1)),
        "ids": np.array([g * 100 + lanes for g in range(2)]),
    }
    for name in names:
        np.testing.assert_array_equal(out[name].reshape(2, 32), expect[name], err_msg=name)
    assert len(set(out["sum"][:32].view(np.uint32))) == 1  # every lane bit-identical


EARLY_EXIT = """
  uint t = thread_index_in_threadgroup;
  if (t >= 32 + 20) {
    return;  // lanes 20..31 of the second simdgroup leave
  }
  out[t] = simd_sum(x[t]);
"""


def test_simd_sum_after_some_lanes_return():
    k = metal_kernel("early_exit", ["x"], ["out"], EARLY_EXIT)
    x = np.arange(64, dtype=np.float32)
    outputs = {"out": ((64,), mx.float32)}
    _, out, _ = emulate(k, {"x": x}, outputs, (64, 1, 1), (64, 1, 1), init_value=-1)
    np.testing.assert_array_equal(out["out"][:32], x[:32].sum())
    np.testing.assert_array_equal(out["out"][32:52], x[32:52].sum())
    np.testing.assert_array_equal(out["out"][52:], -1)


EDGES = """
  threadgroup uint seen[8];
  uint3 p = thread_position_in_grid;
  uint3 s = threads_per_threadgroup;
  uint t = thread_index_in_threadgroup;
  uint i = p.y * W + p.x;
  seen[t] = 1;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  uint n = 0;
  for (uint j = 0; j < s.x * s.y * s.z; ++j) {
    n += seen[j];
  }
  size[i] = s.x * 10 + s.y;
  index[i] = t;
  group[i] = threadgroup_position_in_grid.y * 10 + threadgroup_position_in_grid.x;
  count[i] = n + 100 * (threadgroups_per_grid.x * 10 + threadgroups_per_grid.y);
"""


def test_grid_not_a_multiple_of_the_threadgroup():
    # Grid (10, 3) in (4, 2) threadgroups: edge groups are 2 wide and/or 1 tall (dispatchThreads),
    # and threads_per_threadgroup reports their real size.
    names = ["size", "index", "group", "count"]
    k = metal_kernel("edges", ["w"], names, EDGES)
    outputs = {n: ((3, 10), mx.uint32) for n in names}
    w = np.zeros(1, np.int32)
    _, out, _ = emulate(k, {"w": w}, outputs, (10, 3, 1), (4, 2, 1), template=[("W", 10)])
    y, x = np.mgrid[0:3, 0:10]
    sx, sy = np.where(x >= 8, 2, 4), np.where(y >= 2, 1, 2)
    np.testing.assert_array_equal(out["size"], sx * 10 + sy)
    np.testing.assert_array_equal(out["index"], (y % 2) * sx + x % 4)
    np.testing.assert_array_equal(out["group"], (y // 2) * 10 + x // 4)
    np.testing.assert_array_equal(out["count"], sx * sy + 100 * 32)


LOW_PRECISION = """
  uint i = thread_position_in_grid.x;
  f[i] = float(x[i]) * 2.0f + float(y[i]);
  b[i] = static_cast<bfloat16_t>(float(x[i]) + float(y[i]));
  prod[i] = y[i] * y[i];  // bf16 * bf16 is a bfloat16
"""


def test_half_and_bfloat16_buffers():
    k = metal_kernel("low_precision", ["x", "y"], ["f", "b", "prod"], LOW_PRECISION)
    rng = np.random.default_rng(2)
    x = rng.normal(size=16).astype(np.float16)
    yf = rng.normal(size=16).astype(np.float32)
    y = mx.array(yf).astype(mx.bfloat16)
    ybits = np.array(y.view(mx.uint16))
    np.testing.assert_array_equal(to_bfloat16_bits(yf), ybits)  # our rounding is MLX's
    outputs = {"f": ((16,), mx.float32), "b": ((16,), mx.bfloat16), "prod": ((16,), mx.bfloat16)}
    src, out, _ = emulate(k, {"x": x, "y": y}, outputs, (16, 1, 1), (16, 1, 1))
    assert [p.type for p in src.params[:2]] == ["float16_t", "bfloat16_t"]
    yv, xv = from_bfloat16_bits(ybits), x.astype(np.float32)
    np.testing.assert_array_equal(out["f"], xv * 2 + yv)
    np.testing.assert_array_equal(to_bfloat16_bits(out["b"]), to_bfloat16_bits(xv + yv))
    np.testing.assert_array_equal(out["prod"], np.array((y * y).astype(mx.float32)))
    # a float32 input is rounded to bfloat16 on the way in, as MLX's astype does
    outs, _ = run_kernel(src, {"x": x, "y": yf}, {n: ((16,), np.float32) for n in outputs},
                         (16, 1, 1), (16, 1, 1))  # fmt: skip
    np.testing.assert_array_equal(outs["f"], out["f"])


COUNTING = """
  uint lane = thread_index_in_simdgroup;
  for (int j = 0; j < n[thread_position_in_grid.y]; ++j) {
    if (lane == 0) {
      HAM_COUNT(keys_visited);
    }
  }
  if (n[0] < 0) {
    HAM_COUNT(never);
  }
  atomic_fetch_add_explicit(total, 1.0f, memory_order_relaxed);
"""


def test_counter_hook_and_atomic_outputs():
    header = "#ifndef HAM_COUNT\n#define HAM_COUNT(name)\n#endif\n"  # as in our kernel headers
    k = metal_kernel("counting", ["n"], ["total"], COUNTING, header=header, atomic_outputs=True)
    n = np.array([3, 0, 5], dtype=np.int32)
    outputs = {"total": ((1,), mx.float32)}
    src, out, counters = emulate(k, {"n": n}, outputs, (32, 3, 1), (32, 1, 1), init_value=0)
    assert src.param("total").type == "atomic<float>"
    assert counters == {"keys_visited": 8, "never": 0}
    assert out["total"][0] == 96


HEADER = """
#include <metal_stdlib>
using namespace metal;
METAL_FUNC float twice(const device float* p, uint i) { return 2.0f * p[i]; }
template <typename T>
METAL_FUNC T total(threadgroup T* buf, uint n) {
  T s = 0;
  for (uint i = 0; i < n; ++i) s += buf[i];
  return s;
}
"""

LIBRARY = """
  threadgroup float buf[32];
  threadgroup float* p = buf;
  uint t = thread_index_in_threadgroup;
  float v = x[elem_to_loc(t, x_shape, x_strides, x_ndim)];
  p[t] = v;
  threadgroup_barrier(mem_flags::mem_threadgroup | mem_flags::mem_device);
  thread float r[2] = {v, -v};
  thread float* rp = r;
  half h = half(1.5f);
  h = h * h + half(0.25f);
  bfloat16_t b = bfloat16_t(3.0f);
  b += 1.0f;
  b = b * bfloat16_t(2.0f) - 1;
  const float nan = numeric_limits<float>::quiet_NaN();
  float o[N] = {
    metal::exp(v) - metal::fast::exp(v) + metal::precise::exp(0.0f) + log(1.0f),
    max(v, 0.0f) + min(rp[1], 0.0f) + float(abs(-3)) + abs(-2.5f),
    sqrt(16.0f) * rsqrt(4.0f) + fma(2.0f, 3.0f, 1.0f) + clamp(5.0f, 0.0f, 2.0f),
    select(1.0f, 2.0f, v > 100.0f) + float(isnan(nan)) + float(isinf(Limits<float>::max)),
    float(numeric_limits<half>::max()) + float(metal::numeric_limits<bfloat16_t>::max()),
    as_type<float>(as_type<uint>(1.5f)) + metal::fast::divide(1.0f, 4.0f) + signbit(-0.0f),
    fmax(nan, 1.0f) + max(nan, 2.0f),
    tanh(0.0f) + floor(1.7f) + ceil(1.2f) + round(2.5f) + exp2(3.0f) + log2(8.0f) + pow(2.0f, 3.0f),
    float(h) + float(b),
    twice(x, 1) + total(buf, 32u),
    simd_prefix_inclusive_sum(1.0f) + simd_broadcast_first(v),
    float(simd_any(t == 3)) + 2.0f * float(simd_all(t < 100)),
    float(simd_max(int(t))) + float(simd_min(uint(t) + 1u)),
    float(simd_shuffle_up(t, 1)),
    float(simd_sum(half(1.0f))) + float(simd_sum(bfloat16_t(1.0f))),
    float(threads_per_simdgroup + simdgroups_per_threadgroup + dispatch_threads_per_threadgroup.x),
    float(quadgroup_index_in_threadgroup * 10 + thread_index_in_quadgroup),
  };
  for (int i = 0; i < N; ++i) {
    atomic_store_explicit(&out[t * N + i], o[i], memory_order_relaxed);
  }
  atomic_fetch_max_explicit(&stats[0], int(t), memory_order_relaxed);
  atomic_fetch_add_explicit(&stats[1], 1, memory_order_relaxed);
"""


def test_metal_library_subset():
    # Math, limits, conversions, SIMD and atomic functions, address-space qualifiers in a header,
    # #include <metal_stdlib>, elem_to_loc with x_shape/x_strides/x_ndim (ensure_row_contiguous
    # off) and atomic outputs.
    k = metal_kernel("library", ["x"], ["out", "stats"], LIBRARY, header=HEADER,
                     ensure_row_contiguous=False, atomic_outputs=True)  # fmt: skip
    N, x = 17, np.arange(32, dtype=np.float32)
    outputs = {"out": ((32, N), mx.float32), "stats": ((2,), mx.int32)}
    src, out, _ = emulate(k, {"x": x}, outputs, (32, 1, 1), (32, 1, 1), template=[("N", N)],
                          init_value=0)  # fmt: skip
    assert src.param("out").type == "atomic<float>"
    t = np.arange(32, dtype=np.float32)
    big = np.float32(65504) + from_bfloat16_bits(np.uint16(0x7F7F))
    shuffled_up = np.maximum(t - 1, 0)  # lane 0 keeps its own value
    expect = [1, 5.5, 11, 3, big, 2.75, 3, 25, 9.5, 498, t + 1, 3, 32, shuffled_up, 64, 65,
              (t // 4) * 10 + t % 4]  # fmt: skip
    np.testing.assert_array_equal(out["out"], np.stack(np.broadcast_arrays(*expect), axis=1))
    np.testing.assert_array_equal(out["stats"], [31, 32])


def test_compile_error_is_readable():
    k = metal_kernel("broken", ["x"], ["out"], "out[0] = x[0] + not_declared;")
    with pytest.raises(MetalEmulationError, match=r"(?s)broken\.metal:\d+.*not_declared"):
        emulate(
            k, {"x": np.zeros(4, np.float32)}, {"out": ((1,), mx.float32)}, (1, 1, 1), (1, 1, 1)
        )


def test_missing_input_is_named():
    k = metal_kernel("two_inputs", ["x", "y"], ["out"], "out[0] = x[0] + y[0];")
    x = np.zeros(4, np.float32)
    one = dict(grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(1,)])
    src = kernel_source(k, inputs=[mx.array(x), mx.array(x)], output_dtypes=[mx.float32], **one)
    with pytest.raises(MetalEmulationError, match="no value for input y"):
        run_kernel(src, {"x": x}, {"out": ((1,), np.float32)}, (1, 1, 1), (1, 1, 1))


# mlx-lm's gated-delta Metal kernels (made only where Metal is available, so is_available is
# patched while they are made): name -> (maker, Dk, value rows per grid y, threadgroup).
MLX_LM_KERNELS = {
    "simd_sum": ("_make_gated_delta_kernel", 64, 1, (32, 4, 1)),
    "packed": ("_make_gated_delta_packed_kernel", 128, 8, (32, 2, 1)),
}


@pytest.mark.parametrize("which", list(MLX_LM_KERNELS))
def test_mlx_lm_gated_delta_kernel_matches_mx_fast(which, monkeypatch):
    gd = pytest.importorskip("mlx_lm.models.gated_delta")
    maker, Dk, rows_per_y, tg = MLX_LM_KERNELS[which]
    if not hasattr(gd, maker):
        pytest.skip(f"this mlx-lm has no {maker}")
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    kernel = getattr(gd, maker)()
    B, T, Hk, Hv, Dv = 1, 6, 1, 2, 16
    rng = np.random.default_rng(3)

    def unit(*shape):
        x = rng.normal(size=shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    inputs = {
        "q": unit(B, T, Hk, Dk) * Dk**-0.5, "k": unit(B, T, Hk, Dk),
        "v": rng.normal(size=(B, T, Hv, Dv)).astype(np.float32),
        "g": rng.uniform(0.5, 1.0, (B, T, Hv)).astype(np.float32),  # linear decay
        "beta": rng.uniform(0, 1, (B, T, Hv)).astype(np.float32),
        "state_in": rng.normal(size=(B, Hv, Dv, Dk)).astype(np.float32) * 0.1,
        "T": T,
    }  # fmt: skip
    outputs = {"y": ((B, T, Hv, Dv), mx.float32), "state_out": ((B, Hv, Dv, Dk), mx.float32)}
    tmpl = [("InT", mx.float32), ("StT", mx.float32), ("Dk", Dk), ("Dv", Dv), ("Hk", Hk),
            ("Hv", Hv)]  # fmt: skip
    grid = (32, Dv // rows_per_y, B * Hv)
    _, out, _ = emulate(kernel, inputs, outputs, grid, tg, template=tmpl)
    arrays = [mx.array(inputs[n]) for n in ("q", "k", "v", "g", "beta", "state_in")]
    y, state = mx.fast.gated_delta_update(*arrays)
    np.testing.assert_allclose(out["y"], np.array(y), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["state_out"], np.array(state), rtol=1e-5, atol=1e-5)
