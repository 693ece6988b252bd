"""The depthwise causal conv + SiLU (spec §3 step 2): compiled and op by op against a float64
loop, with a carried state and right padding."""

import mlx.core as mx
import numpy as np
import pytest

from ham_mlx.layers import common


def reference(x, w, prev, ends):
    """float64 loop: y[b, t, c] = silu(Σ_i xp[b, t + i, c] w[c, i]); the carried state is the
    last Kc-1 real inputs of each row."""
    x, w, prev = (np.array(a, dtype=np.float64) for a in (x, w, prev))
    B, L, C = x.shape
    Kc = w.shape[1]
    xp = np.concatenate([prev, x], axis=1)
    y = np.zeros((B, L, C))
    for t in range(L):
        y[:, t] = sum(xp[:, t + i] * w[:, i, 0] for i in range(Kc))
    y = y / (1 + np.exp(-y))
    state = np.stack([xp[b, e : e + Kc - 1] for b, e in enumerate(ends)])
    return y, state


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
@pytest.mark.parametrize("ends", [[9, 9], [9, 4]], ids=["full", "padded"])
def test_matches_the_loop(compiled, ends, monkeypatch):
    monkeypatch.setattr(common, "COMPILE", compiled)
    monkeypatch.setattr(common, "_COMPILED", {})
    rng = np.random.default_rng(0)
    x = mx.array(rng.normal(size=(2, 9, 5)), dtype=mx.float32)
    w = mx.array(rng.normal(size=(5, 4, 1)), dtype=mx.float32)
    prev = mx.array(rng.normal(size=(2, 3, 5)), dtype=mx.float32)
    y, state = common.causal_short_conv(x, w, prev, np.array(ends))
    want_y, want_state = reference(x, w, prev, ends)
    np.testing.assert_allclose(np.array(y), want_y, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.array(state), want_state.astype(np.float32))


def test_compiled_and_eager_agree_bit_for_bit(monkeypatch):
    rng = np.random.default_rng(1)
    x = mx.array(rng.normal(size=(1, 300, 64)), dtype=mx.float32)
    w = mx.array(rng.normal(size=(64, 4, 1)), dtype=mx.float32)
    outs = []
    for compiled in (True, False):
        monkeypatch.setattr(common, "COMPILE", compiled)
        outs.append(np.array(common.causal_short_conv(x, w, None)[0]))
    np.testing.assert_array_equal(outs[0], outs[1])
