"""The GDN and HAM layers against an independent float64 numpy implementation of the spec, and
the threshold extremes (spec §4.2)."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_model
from mlx.utils import tree_flatten
from reference import ham_layer, layer_params

from ham_mlx.layers.gdn import GatedDeltaNet

CASES = {
    "cosine": {},
    "l2": {"ham_router": "l2", "ham_threshold": 0.95},
    "learned": {"ham_router": "learned", "ham_threshold": 0.52},
    "gva-negeig-sigmoid": {
        "num_v_heads": 4,
        "allow_neg_eigval": True,
        "output_gate_activation": "sigmoid",
        "ham_threshold": 0.7,
    },  # fmt: skip
    "no-gate": {"use_gate": False},
}


def ref_cfg(model):
    a = model.args
    return dict(
        H=a.num_heads, HV=a.num_v_heads, Dk=a.head_dim, Dv=a.head_v_dim, eps=a.norm_eps,
        neg_eig=a.allow_neg_eigval, gate_act=a.output_gate_activation, router=a.ham_router,
    )  # fmt: skip


def inputs(seed=0, B=2, T=20, D=32):
    return np.random.default_rng(seed).normal(0, 1, (B, T, D)).astype(np.float32)


@pytest.mark.parametrize("name", list(CASES))
def test_ham_layer_matches_numpy_reference(name):
    model = make_model(("ham",), **CASES[name])
    layer = model.layers[0].attn
    x = inputs()
    tau = float(layer.threshold)
    ref = ham_layer(layer_params(layer), x.astype(np.float64), ref_cfg(model), tau)
    cache = model.make_cache()[0]
    y = layer(mx.array(x), cache)
    np.testing.assert_allclose(np.array(y), ref["y"], atol=1e-4, rtol=0)
    # Same admission decisions, except where the score is within float noise of τ.
    n = cache.admitted_counts()
    margin = np.abs(ref["score"] - tau) > 1e-4
    for b in range(x.shape[0]):
        pos = set(np.array(cache.positions[b, : n[b]]).tolist())
        ours = np.array([t in pos for t in range(x.shape[1])])
        assert np.array_equal(ours[margin[b]], ref["admitted"][b][margin[b]])
    assert 0 < ref["admitted"].sum() < ref["admitted"].size


def test_gdn_layer_matches_numpy_reference():
    model = make_model(("gdn",), num_v_heads=4, allow_neg_eigval=True)
    layer = model.layers[0].attn
    x = inputs(1)
    ref = ham_layer(layer_params(layer), x.astype(np.float64), ref_cfg(model), None)
    np.testing.assert_allclose(np.array(layer(mx.array(x))), ref["y"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("tau", [0.0, -1.0])
def test_threshold_at_or_below_zero_is_dense_attention(tau):
    """τ <= 0 admits every token: the attention term is plain causal attention over all tokens."""
    model = make_model(("ham",))
    layer = model.layers[0].attn
    layer.threshold = mx.array(tau)
    x = inputs(2)
    p = layer_params(layer)
    dense = ham_layer(p, x.astype(np.float64), ref_cfg(model), -np.inf)  # every token admitted
    assert dense["admitted"].all()
    y = layer(mx.array(x))
    np.testing.assert_allclose(np.array(y), dense["y"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["cosine", "gva-negeig-sigmoid"])
def test_threshold_above_two_is_a_gdn_layer(name):
    """τ > 2 admits nothing: the attention term is exactly zero and the HAM layer equals a GDN
    layer with the same weights."""
    model = make_model(("ham",), **CASES[name])
    ham = model.layers[0].attn
    ham.threshold = mx.array(2.01)
    gdn = GatedDeltaNet(model.args)
    shared = {
        k: v for k, v in tree_flatten(ham.parameters()) if k in dict(tree_flatten(gdn.parameters()))
    }
    gdn.load_weights(list(shared.items()))
    x = mx.array(inputs(3))
    cache = model.make_cache()[0]
    y_ham = ham(x, cache)
    assert cache.admitted_counts() == [0, 0]
    gdn_cache = make_model(("gdn",), **CASES[name]).make_cache()[0]  # the same (cached) scan
    np.testing.assert_array_equal(np.array(y_ham), np.array(gdn(x, gdn_cache)))
