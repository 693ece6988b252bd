"""The router registry (ham_mlx.routers): one list of kinds shared by config validation, the ONNX
lowering and the PyTorch reference; its MLX math against a float64 numpy twin; the admit-all /
admit-none thresholds."""

import math

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_args

from ham_mlx.config import ConfigError
from ham_mlx.routers import (
    EPS,
    ROUTERS,
    Router,
    RouterKind,
    check_table,
    get_router,
    head_surprise,
    key_bias,
    learned_score,
    token_score,
)

HEAD_KINDS = [name for name, kind in ROUTERS.items() if kind.per_head]
LEARNED_KINDS = [name for name, kind in ROUTERS.items() if kind.learned]


def test_registry_is_the_only_list_of_kinds():
    assert set(ROUTERS) == {"cosine", "l2", "learned"}
    assert all(isinstance(k, RouterKind) and k.name == name for name, k in ROUTERS.items())
    assert all(k.key_bias_column == k.learned and k.per_head != k.learned for k in ROUTERS.values())
    # config validation accepts exactly the registry's names
    candidates = [*ROUTERS, "bogus", "COSINE", "", "l1"]
    accepted = set()
    for name in candidates:
        try:
            tiny_args(("ham",), ham_router=name)
        except ConfigError as e:
            assert "ham_router" in str(e)
        else:
            accepted.add(name)
    assert accepted == set(ROUTERS)
    with pytest.raises(ConfigError, match="ham_router"):
        tiny_args(("ham",), ham_router=["cosine"])
    for name in LEARNED_KINDS:
        with pytest.raises(ConfigError, match="ham_router_hidden"):
            tiny_args(("ham",), ham_router=name, ham_router_hidden=0)
    # the ONNX lowering and the torch reference have one entry per kind
    from export.lower import ROUTER_LOWERINGS

    assert set(ROUTER_LOWERINGS) == set(ROUTERS)
    pytest.importorskip("torch")
    from convert.torch_reference import SCORES

    assert set(SCORES) == set(ROUTERS)


def test_get_router_names_the_bad_value_and_the_valid_ones():
    for name, kind in ROUTERS.items():
        assert get_router(name) is kind
        assert get_router(kind) is kind
    for bad in ("bogus", None, 3):
        with pytest.raises(ValueError) as info:
            get_router(bad)
        msg = str(info.value)
        assert repr(bad) in msg and all(name in msg for name in ROUTERS)


def test_check_table_wants_exactly_the_registry():
    check_table(dict.fromkeys(ROUTERS), "ok")
    with pytest.raises(RuntimeError, match="missing.*learned"):
        check_table({"cosine": 1, "l2": 2}, "t")
    with pytest.raises(RuntimeError, match="unknown.*bogus"):
        check_table({**dict.fromkeys(ROUTERS), "bogus": 1}, "t")


# ---- head routers against a float64 numpy twin ---------------------------------------------------
def surprise64(v_hat: np.ndarray, v: np.ndarray, name: str) -> np.ndarray:
    """The spec's formulas (§4.1), element by element in float64."""
    v_hat, v = v_hat.astype(np.float64), v.astype(np.float64)
    out = np.empty(v.shape[:-1])
    for idx in np.ndindex(*out.shape):
        a, b = v_hat[idx], v[idx]
        if name == "cosine":
            out[idx] = 1.0 - float(a @ b) / math.sqrt((float(a @ a) + EPS) * (float(b @ b) + EPS))
        else:
            out[idx] = float((b - a) @ (b - a)) / (float(b @ b) + EPS)
    return out


def head_inputs(seed: int, shape=(2, 7, 3, 16)) -> tuple[np.ndarray, np.ndarray]:
    """v_hat, v float32 [B, L, HV, Dv] with special rows: v_hat = 0, v = 0, v_hat = ±c v."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(shape) * np.exp(rng.uniform(-3, 3, shape[:-1] + (1,)))
    v_hat = rng.standard_normal(shape) * np.exp(rng.uniform(-3, 3, shape[:-1] + (1,)))
    v_hat[0, 0] = 0.0  # nothing predicted: cosine e = 1, l2 e = ‖v‖²/(‖v‖²+ε)
    v[0, 1] = 0.0  # nothing to predict
    v_hat[1, 2] = 0.5 * v[1, 2]  # a perfect direction
    v_hat[1, 3] = -2.0 * v[1, 3]  # the opposite direction
    v_hat[1, 4] = v[1, 4]  # a perfect prediction
    return v_hat.astype(np.float32), v.astype(np.float32)


@pytest.mark.parametrize("name", HEAD_KINDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_head_surprise_matches_float64(name, seed):
    v_hat, v = head_inputs(seed)
    e = head_surprise(mx.array(v_hat), mx.array(v), name)
    assert e.dtype == mx.float32 and e.shape == v.shape[:-1]
    ref = surprise64(v_hat, v, name)
    np.testing.assert_allclose(np.array(e), ref, rtol=1e-5, atol=1e-5)
    s = token_score(e)
    np.testing.assert_array_equal(np.array(s), np.array(e).min(-1))
    if name == "cosine":
        np.testing.assert_array_equal(np.array(e[0, 0]), 1.0)  # v_hat = 0
        np.testing.assert_array_equal(np.array(e[0, 1]), 1.0)  # v = 0
    # a low-precision v is upcast first; the result stays float32
    e16 = head_surprise(mx.array(v_hat), mx.array(v).astype(mx.float16), get_router(name))
    assert e16.dtype == mx.float32
    ref16 = surprise64(v_hat, v.astype(np.float16), name)
    np.testing.assert_allclose(np.array(e16), ref16, rtol=1e-5, atol=1e-5)


def test_head_surprise_refuses_a_learned_router():
    v = mx.zeros((1, 1, 2, 4))
    for name in LEARNED_KINDS:
        with pytest.raises(ValueError, match=name):
            head_surprise(v, v, name)


# ---- the learned router -------------------------------------------------------------------------
def test_learned_score_is_the_router_module():
    mx.random.seed(0)
    router = Router(24, 8)
    h = mx.random.normal((2, 5, 24))
    r = router(h)
    assert r.shape == (2, 5) and r.dtype == mx.float32
    np.testing.assert_allclose(np.array(learned_score(router.parameters(), h)), np.array(r),
                               rtol=1e-6, atol=1e-6)  # fmt: skip
    w1, w2, b2 = (np.array(w, dtype=np.float64)
                  for w in (router.fc1.weight, router.fc2.weight, router.fc2.bias))  # fmt: skip
    z = np.array(h, dtype=np.float64) @ w1.T
    logit = (z / (1 + np.exp(-z))) @ w2.T + b2
    np.testing.assert_allclose(np.array(r), 1 / (1 + np.exp(-logit[..., 0])), rtol=1e-5, atol=1e-6)
    assert set(dict(router.parameters())) == {"fc1", "fc2"}  # checkpoint names: router.fc1/fc2.*


def test_key_bias():
    r = mx.array([0.0, 1e-9, 1e-6, 0.5, 1.0])
    np.testing.assert_allclose(np.array(key_bias(r)), np.log([EPS, EPS, EPS, 0.5, 1.0]), rtol=1e-6)


# ---- admit_all / admit_none ----------------------------------------------------------------------
def random_scores(name: str, seed: int) -> mx.array:
    """Scores of kind `name` as the layers compute them, over a wide range of inputs."""
    kind = get_router(name)
    rng = np.random.default_rng(seed)
    if kind.per_head:
        B, HV, Dv = 4096, 2, int(rng.integers(1, 96))
        v = rng.standard_normal((B, HV, Dv)) * np.exp(rng.uniform(-6, 6, (B, HV, 1)))
        c = np.exp(rng.uniform(-6, 6, (B, HV, 1))) * rng.choice([-1.0, 1.0], (B, HV, 1))
        noise = rng.standard_normal((B, HV, Dv)) * rng.choice([0.0, 1e-4, 1.0], (B, HV, 1))
        v_hat = c * v + noise * np.abs(v).max(-1, keepdims=True)  # incl. exactly ±parallel
        v_hat[: B // 16] = 0.0
        v_hat[B // 16 : B // 8] = v[B // 16 : B // 8]  # a perfect prediction: l2 e = 0
        e = head_surprise(mx.array(v_hat.astype(np.float32)), mx.array(v.astype(np.float32)), kind)
        return token_score(e)
    router = Router(16, 8)
    router.fc2.bias = mx.array([float(rng.uniform(-5, 5))])
    scale = np.exp(rng.uniform(-4, 4, (512, 1, 1)))  # logits from ~0 to saturation
    h = mx.array((rng.standard_normal((512, 8, 16)) * scale).astype(np.float32))
    return router(h)


@pytest.mark.parametrize("name", list(ROUTERS))
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_admit_all_and_admit_none(name, seed):
    kind = get_router(name)
    s = random_scores(name, seed)
    assert bool(mx.all(s >= kind.admit_all)), f"{name}: admit_all={kind.admit_all} missed a token"
    assert not bool(mx.any(s >= kind.admit_none)), f"{name}: admit_none admitted a token"
    low, high = kind.score_range
    s = np.array(s)
    assert np.isfinite(s).all() and low - 1e-5 <= s.min() and s.max() <= high + 1e-5
    assert kind.admit_all <= low and (kind.admit_none > high or kind.admit_none == math.inf)
