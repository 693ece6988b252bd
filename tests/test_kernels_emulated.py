"""The Metal kernels, as MLX generates them, compiled with g++ and run on this CPU under the
emulation in tests/metal_emulation, against the MLX-ops references. This checks the kernels'
logic and indexing on Linux; it does not compile them with Apple's Metal compiler or run them on
an Apple GPU (tests/test_kernels_gpu.py does that on a Mac)."""

import ham_mlx  # noqa: F401

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from conftest import make_model
from metal_emulation import gxx_available, kernel_source, run_kernel

from ham_mlx.kernels import attention, scan
from ham_mlx.ops.attention import cached_admitted_attention
from ham_mlx.ops.gated_delta import gated_delta_sequential

pytestmark = pytest.mark.skipif(not gxx_available(), reason="g++ is not installed")
NP_DTYPES = {mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.float32}


def recorded_call(call, *args):
    """The exact kernel(...) keyword arguments that `call` (scan.call / attention.call) makes."""
    seen = {}

    def fake_kernel(**kw):
        seen.update(kw)
        return [mx.zeros(s, dtype=d) for s, d in zip(kw["output_shapes"], kw["output_dtypes"])]

    call(fake_kernel, *args)
    return seen


def emulate(kernel, names, outputs, call, *args, sanitize=False):
    """Generate the Metal source of `call(kernel, *args)` and run it under the emulation
    (`sanitize`: built with AddressSanitizer, so a read outside a buffer fails)."""
    kw = recorded_call(call, *args)
    src = kernel_source(
        kernel, inputs=kw["inputs"], template=kw["template"], grid=kw["grid"],
        threadgroup=kw["threadgroup"], output_shapes=kw["output_shapes"],
        output_dtypes=kw["output_dtypes"],
    )  # fmt: skip
    inputs = {
        n: np.array(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x)
        for n, x in zip(names, kw["inputs"])
    }
    outs = {n: (tuple(s), np.float32) for n, s in zip(outputs, kw["output_shapes"])}
    result, counters = run_kernel(
        src, inputs, outs, kw["grid"], kw["threadgroup"], sanitize=sanitize
    )
    return src, kw, [result[n] for n in outputs], counters


def scan_inputs(B, T, H, HV, Dk, Dv, dtype, seed=0, with_state=True):
    rng = np.random.default_rng(seed)

    def unit(*shape):
        x = rng.normal(size=shape)
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    q = mx.array(unit(B, T, H, Dk) * Dk**-0.5).astype(dtype)
    k = mx.array(unit(B, T, H, Dk)).astype(dtype)
    v = mx.array(rng.normal(size=(B, T, HV, Dv)).astype(np.float32)).astype(dtype)
    g = mx.array(-rng.uniform(0.01, 0.7, (B, T, HV)).astype(np.float32))
    beta = mx.array(rng.uniform(0, 2, (B, T, HV)).astype(np.float32))  # allow_neg_eigval range
    state = None
    if with_state:
        state = mx.array(rng.normal(size=(B, HV, Dv, Dk)).astype(np.float32) * 0.3)
    return q, k, v, g, beta, state


SCAN_SHAPES = {  # B, T, H, HV, Dk, Dv
    "T1": (1, 1, 1, 1, 32, 32),
    "short-gva": (2, 6, 2, 4, 32, 64),
    "long": (1, 70, 1, 2, 64, 32),
    "dk96-dv8": (2, 9, 1, 1, 96, 8),
}


@pytest.mark.parametrize("shape", list(SCAN_SHAPES))
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "no-state"])
def test_scan_kernel_fp32(shape, with_state):
    args = scan_inputs(*SCAN_SHAPES[shape], mx.float32, with_state=with_state)
    src, kw, got, _ = emulate(scan.METAL_KERNEL, scan.INPUTS, scan.OUTPUTS, scan.call, *args)
    ref = gated_delta_sequential(*args)
    for name, a, b in zip(scan.OUTPUTS, got, ref):
        b = np.array(b)
        err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)
        assert err <= 1e-5, (shape, name, err)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["fp16", "bf16"])
def test_scan_kernel_half_types(dtype):
    args = scan_inputs(2, 8, 2, 4, 32, 32, dtype)
    _, _, got, _ = emulate(scan.METAL_KERNEL, scan.INPUTS, scan.OUTPUTS, scan.call, *args)
    ref = gated_delta_sequential(*args)  # fp32 arithmetic on the same rounded inputs
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, np.array(b), rtol=1e-5, atol=1e-5)


def test_scan_kernel_signature_and_template():
    args = scan_inputs(2, 3, 2, 4, 64, 32, mx.bfloat16)
    kw = recorded_call(scan.call, *args)
    src = kernel_source(
        scan.METAL_KERNEL, inputs=kw["inputs"], template=kw["template"], grid=kw["grid"],
        threadgroup=kw["threadgroup"], output_shapes=kw["output_shapes"],
        output_dtypes=kw["output_dtypes"],
    )  # fmt: skip
    assert src.template_params == ("InT", "Dk", "Dv", "H", "HV")
    assert src.template_args == ("bfloat16_t", "64", "32", "2", "4")
    buffers = [p.name for p in src.params if p.buffer is not None]
    assert buffers == scan.INPUTS + scan.OUTPUTS
    for name in ("q", "k", "v"):
        assert src.param(name).element_type == "bfloat16_t"
    for name in scan.OUTPUTS:
        assert src.param(name).element_type == "float" and src.param(name).is_output
    attrs = sorted(p.name for p in src.params if p.buffer is None)
    assert attrs == ["thread_position_in_grid", "thread_position_in_threadgroup"]
    assert kw["grid"] == (32, 32, 8) and kw["threadgroup"] == (32, 4, 1)


def attention_case(B, H, HV, L, N, Dk, Dv, counts, bias, seed=0, dtype=mx.float32):
    """Compact-cache arguments: positions ascending per row, queries at the end."""
    rng = np.random.default_rng(seed)

    def r(*s):
        return mx.array(rng.normal(size=s).astype(np.float32))

    span = N + L + 5
    pos = np.stack([np.sort(rng.choice(span - L, N, replace=False)) for _ in range(B)])
    q_pos = np.arange(span - L, span)
    if L > 1:  # let the last few keys of each row fall inside the query block (causal cut)
        pos[:, -2:] = q_pos[L // 2]
    return (
        r(B, H, L, Dk).astype(dtype), r(B, H, N, Dk).astype(dtype), r(B, HV, N, Dv).astype(dtype),
        mx.array(counts, dtype=mx.int32), mx.array(pos.astype(np.int32)),
        mx.array(q_pos.astype(np.int32)), r(HV) * 0.3, r(HV), r(B, N) if bias else None,
        r(B, L, HV), r(Dv) + 1.0, 1e-6,
    )  # fmt: skip


def visit_inputs(args):
    """Counts `[B]`, key positions `[B, N]`, query positions `[L]` and HV of attention args."""
    counts, pos, q_pos = (np.array(a) for a in args[3:6])
    return counts, pos, q_pos, args[2].shape[1]


def admitted_at_or_before(counts, pos, b, position):
    """Admitted entries of row b whose position is <= `position`."""
    return int(np.sum(pos[b, : counts[b]] <= position))


def per_query_visits(args):
    """Keys a walk per (row, head, query) visits: the admitted entries at or before the query."""
    counts, pos, q_pos, HV = visit_inputs(args)
    return HV * sum(
        admitted_at_or_before(counts, pos, b, qp) for b in range(len(counts)) for qp in q_pos
    )


def tile_visits(args, QT):
    """Keys a walk per (row, head, tile of QT queries) visits: the admitted entries at or before
    the tile's last (largest) query position."""
    counts, pos, q_pos, HV = visit_inputs(args)
    tiles = [q_pos[s : s + QT] for s in range(0, len(q_pos), QT)]
    return HV * sum(
        admitted_at_or_before(counts, pos, b, tile.max())
        for b in range(len(counts))
        for tile in tiles
    )


def check_attention(args, sanitize=False):
    """Emulate the kernel on `args`; check it against the reference and the visited-key count
    against `tile_visits`. Returns the generated source, the output and the counters."""
    src, kw, (got,), counters = emulate(
        attention.METAL_KERNEL, attention.INPUTS, attention.OUTPUTS, attention.call, *args,
        sanitize=sanitize,
    )  # fmt: skip
    ref = np.array(cached_admitted_attention(*args))
    err = np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)
    assert err <= 1e-5 or np.abs(got - ref).max() <= 1e-6, err
    B, _, L, Dk = args[0].shape
    HV, Dv = args[2].shape[1], args[2].shape[3]
    QT = attention.query_tile(Dk, Dv)
    assert kw["grid"] == (32, -(-L // QT), B * HV) and kw["threadgroup"] == (32, 1, 1)
    assert counters["keys_visited"] == tile_visits(args, QT)
    return src, got, counters


ATTN_CASES = {  # B, H, HV, L, N, Dk, Dv, counts, bias
    "decode": (2, 1, 1, 1, 12, 32, 32, [12, 5], False),
    "decode-empty-and-full": (2, 2, 4, 1, 9, 32, 64, [0, 9], False),
    "prefill-gva-bias": (2, 2, 4, 6, 14, 64, 32, [14, 3], True),
    "all-empty": (1, 1, 2, 3, 4, 32, 32, [0], True),
    "prefill-ragged-tiles": (2, 1, 2, 19, 16, 32, 32, [16, 7], True),  # QT 8: tiles 8, 8, 3
    "prefill-dk128-dv256": (1, 2, 2, 12, 10, 128, 256, [10], False),  # QT 5: tiles 5, 5, 2
}


@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_kernel_fp32(case):
    args = attention_case(*ATTN_CASES[case])
    src, got, _ = check_attention(args)
    B, H, HV, L, N, Dk, Dv, counts, bias = ATTN_CASES[case]
    assert src.template_params == ("InT", "Dk", "Dv", "H", "HV", "HAS_BIAS")
    assert src.template_args == ("float", str(Dk), str(Dv), str(H), str(HV), str(int(bias)))
    assert [p.name for p in src.params if p.buffer is not None] == attention.INPUTS + ["out"]
    for b, c in enumerate(counts):
        if c == 0:
            assert np.all(got[b] == 0.0)  # an empty cache gives exactly zero


@pytest.mark.parametrize("L", [2, 7, 11])
def test_attention_kernel_partial_tiles(L):
    """L < QT and L not a multiple of QT: the live queries of the last tile match the reference,
    and nothing is read or written outside a buffer (AddressSanitizer build)."""
    args = attention_case(2, 2, 4, L, 12, 32, 64, [12, 4], True)
    QT = attention.query_tile(32, 64)
    assert L % QT != 0  # 2 and 7 below QT = 8, 11 past it
    check_attention(args, sanitize=True)


def with_key_positions(args, pos):
    """`args` with the key positions replaced by `pos` `[B, N]`."""
    return args[:4] + (mx.array(pos.astype(np.int32)),) + args[5:]


def prefill_key_positions(q_pos, N, B, in_block, seed=0):
    """Sorted positions `[B, N]`: all before the first query, or half of them before and half
    at queries' own positions (tokens of the prefill block admitted to the cache)."""
    rng = np.random.default_rng(seed)
    inside = N // 2 if in_block else 0

    def row():
        before = rng.choice(q_pos[0], N - inside, replace=False)
        return np.sort(np.concatenate([before, rng.choice(q_pos, inside, replace=False)]))

    return np.stack([row() for _ in range(B)])


@pytest.mark.parametrize("in_block", [False, True], ids=["cache-before", "keys-in-block"])
def test_attention_kernel_prefill_reads_keys_once_per_tile(in_block):
    """A long prefill: the emulated kernel visits each admitted key once per tile of QT queries,
    about QT times fewer visits than a walk per query."""
    B, HV, L, N, counts = 2, 2, 64, 48, [48, 30]
    args = attention_case(B, 1, HV, L, N, 32, 32, counts, True)
    q_pos = np.array(args[5])
    args = with_key_positions(args, prefill_key_positions(q_pos, N, B, in_block))
    _, _, counters = check_attention(args)  # == tile_visits(args, QT)
    QT = attention.query_tile(32, 32)
    tiles, visited, per_query = -(-L // QT), counters["keys_visited"], per_query_visits(args)
    print(f"\nprefill L={L} QT={QT} ({'keys in block' if in_block else 'cache before'}): "
          f"keys_visited {visited} (tiles), {per_query} (a walk per query)")  # fmt: skip
    if not in_block:  # every query sees the same keys: exactly ceil(L / QT) / L of the walks
        assert visited * L == tiles * per_query
        return
    # Keys inside the block: a tile visits its last query's keys, at most the mean over its QT
    # queries plus the keys inside its span, so (L a multiple of QT) at most 1/QT of the walks
    # per query plus, per head, the keys inside the block.
    inside = sum(
        int(np.sum((p[:c] > q_pos[0]) & (p[:c] <= q_pos[-1])))
        for p, c in zip(np.array(args[4]), counts)
    )  # fmt: skip
    assert L % QT == 0 and visited * QT <= per_query + QT * HV * inside


def test_attention_kernel_fp16():
    args = attention_case(2, 2, 4, 3, 10, 32, 32, [10, 4], True, dtype=mx.float16)
    _, _, (got,), _ = emulate(
        attention.METAL_KERNEL, attention.INPUTS, attention.OUTPUTS, attention.call, *args
    )
    # The kernel reads fp16 and computes in fp32: compare with fp32 ops on the same fp16 values.
    upcast = tuple(a.astype(mx.float32) if i < 3 else a for i, a in enumerate(args))
    np.testing.assert_allclose(got, np.array(cached_admitted_attention(*upcast)), atol=1e-5)
    ref16 = np.array(cached_admitted_attention(*args))  # fp16 ops: within half precision
    np.testing.assert_allclose(got, ref16, rtol=1e-2, atol=1e-2)


def test_attention_kernel_visits_only_admitted_keys_of_a_real_cache():
    """Fill a HAM cache from a model, then run the kernel on the buffers the layer passes: the
    number of keys visited is the admitted count, not the number of tokens seen."""
    model = make_model(("ham",), hidden_size=64, head_dim=32, ham_threshold=0.95)
    T = 48
    ids = mx.array(np.random.default_rng(0).integers(0, 61, (2, T)))
    cache = model.make_cache()
    model(ids[:, :-1], cache)
    layer = model.layers[0].attn
    cache[0].settle()
    x = model.layers[0].attn_norm(model.model.embeddings(ids[:, -1:]))
    rec = layer.recurrence(x, None)  # any query will do: the point is what the kernel reads
    keys, values, scores, positions, count = cache[0].fetch()
    q = rec.q.transpose(0, 2, 1, 3)
    args = (q, keys, values, count, positions, mx.array([T - 1], dtype=mx.int32),
            layer.attn_log_scale, layer.attn_sink, None, layer.kv_gate_proj(x),
            layer.kv_norm.weight, layer.norm_eps)  # fmt: skip
    _, _, (got,), counters = emulate(
        attention.METAL_KERNEL, attention.INPUTS, attention.OUTPUTS, attention.call, *args
    )
    np.testing.assert_allclose(got, np.array(cached_admitted_attention(*args)), atol=1e-5)
    admitted = cache[0].admitted_counts()
    HV = model.args.num_v_heads
    assert counters["keys_visited"] == HV * sum(admitted)
    assert sum(admitted) < 2 * (T - 1) // 2  # far fewer than the tokens seen
