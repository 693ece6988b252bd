"""The CPU fast forms of exp, 2^x, sigmoid and SiLU against MLX's own (their twins) and float64."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from ham_mlx.ops import fast_math

GRID = np.concatenate([np.linspace(-100, 100, 400_001), [-np.inf, 0.0, -0.0, 88.0, -88.0]])


@pytest.fixture(autouse=True)
def on_cpu():
    with mx.stream(mx.cpu):
        assert fast_math.enabled()
        yield


def f32(a) -> mx.array:
    return mx.array(np.asarray(a, dtype=np.float32))


def relative_error(got: mx.array, want: np.ndarray, floor: float) -> float:
    got = np.asarray(got, dtype=np.float64)
    return float(np.max(np.abs(got - want) / np.maximum(np.abs(want), floor)))


def test_exp_matches_float64_like_mlx_does():
    x = GRID[(GRID > -87.0) & (GRID < 88.0)]
    x32 = np.asarray(x, dtype=np.float32)
    want = np.exp(x32.astype(np.float64))
    ours = relative_error(fast_math.exp(f32(x32)), want, 0.0)
    mlx = relative_error(mx.exp(f32(x32)), want, 0.0)
    # Both lose |x| * 2^-24 relative in the float32 product x * log2(e), about 4e-6 at |x| = 88.
    assert ours <= mlx + 2e-7, (ours, mlx)
    small = np.abs(x32) <= 2
    assert relative_error(fast_math.exp(f32(x32[small])), want[small], 0.0) < 3e-7


def padded(values: list[float]) -> mx.array:
    """values followed by zeros up to fast_math.MIN_SIZE elements (the fast forms' minimum)."""
    return f32(values + [0.0] * (fast_math.MIN_SIZE - len(values)))


def test_exp_edges():
    got = np.array(fast_math.exp(padded([-np.inf, -89.0, -1000.0, 0.0, 1.0, 100.0, np.nan])))
    assert got[0] == 0.0 and got[1] == 0.0 and got[2] == 0.0  # exactly zero, like mx.exp
    assert got[3] == 1.0
    assert abs(got[4] - np.e) < 1e-6
    assert got[5] > 1e38 and np.isfinite(got[5])  # saturates instead of inf
    assert np.isnan(got[6])


def test_exp2_matches_float64():
    y = np.asarray(np.linspace(-126, 127, 300_001), dtype=np.float32)
    want = np.exp2(y.astype(np.float64))
    assert relative_error(fast_math.exp2(f32(y)), want, 0.0) < 4e-7
    assert float(fast_math.exp2(padded([-np.inf]))[0]) == 0.0
    assert float(fast_math.exp2(padded([10.0]))[0]) == 1024.0


@pytest.mark.parametrize("name", ["sigmoid", "silu"])
def test_activations_match_mlx(name):
    ours, twin = getattr(fast_math, name), {"sigmoid": mx.sigmoid, "silu": nn.silu}[name]
    x = f32(GRID[np.isfinite(GRID)])
    assert mx.allclose(ours(x), twin(x), rtol=1e-6, atol=1e-30).item()


@pytest.mark.parametrize("name", ["exp", "exp2", "sigmoid", "silu"])
@pytest.mark.parametrize("compiled", [False, True])
def test_gradients_match_mlx(name, compiled):
    twin = {"exp": mx.exp, "exp2": lambda x: mx.power(2.0, x), "sigmoid": mx.sigmoid,
            "silu": nn.silu}[name]  # fmt: skip
    ours = getattr(fast_math, name)
    x = mx.random.normal((4096,), key=mx.random.key(1)) * 6
    r = mx.random.normal((4096,), key=mx.random.key(2))

    def grad(f):
        g = mx.grad(lambda x: (f(x) * r).sum())
        return (mx.compile(g) if compiled else g)(x)

    assert mx.allclose(grad(ours), grad(twin), rtol=2e-6, atol=1e-6).item()


def test_compiled_forward_equals_uncompiled():
    x = mx.random.normal((3, 1000), key=mx.random.key(3)) * 20
    for f in (fast_math.exp, fast_math.silu, fast_math.sigmoid):
        assert mx.array_equal(mx.compile(f)(x), f(x)).item()


def test_off_switch_gives_mlx_functions(monkeypatch):
    monkeypatch.setenv("HAM_MLX_NO_FAST_MATH", "1")
    x = mx.random.normal((100,)) * 10
    assert mx.array_equal(fast_math.exp(x), mx.exp(x)).item()
    assert mx.array_equal(fast_math.silu(x), nn.silu(x)).item()


def test_small_arrays_use_mlx_and_large_ones_the_fast_forms():
    x = mx.random.normal((fast_math.MIN_SIZE,), key=mx.random.key(7)) * 10
    small = x[: fast_math.MIN_SIZE - 1]
    for f, twin in ((fast_math.exp, mx.exp), (fast_math.silu, nn.silu),
                    (fast_math.sigmoid, mx.sigmoid)):  # fmt: skip
        assert mx.array_equal(f(small), twin(small)).item()
        assert not mx.array_equal(f(x), twin(x)).item()  # a few float32 ulp apart somewhere


def test_other_dtypes_use_mlx():
    x = (mx.random.normal((100,)) * 4).astype(mx.float16)
    assert mx.array_equal(fast_math.silu(x), nn.silu(x)).item()


def test_training_cross_entropy_matches_mlx():
    from ham_mlx.train.trainer import cross_entropy

    logits = mx.random.normal((3, 17, 50), key=mx.random.key(4)) * 8
    targets = mx.random.randint(0, 50, (3, 17), key=mx.random.key(5))
    w = mx.random.normal((3, 17), key=mx.random.key(6))
    ours = cross_entropy(logits, targets)
    twin = nn.losses.cross_entropy(logits, targets)
    assert mx.allclose(ours, twin, rtol=1e-5, atol=1e-5).item()
    g1 = mx.grad(lambda z: (cross_entropy(z, targets) * w).sum())(logits)
    g2 = mx.grad(lambda z: (nn.losses.cross_entropy(z, targets) * w).sum())(logits)
    assert mx.allclose(g1, g2, rtol=1e-5, atol=1e-6).item()
