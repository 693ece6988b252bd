import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from ham_mlx import Model, ModelArgs

ATTN = {"num_heads": 2, "num_kv_heads": 1, "rope_theta": 10000.0}


# Layer stacks that every path (cache, chunking, export) is checked on.
LAYER_CONFIGS = {
    "ham-cosine": (("ham",), {}),
    "ham-l2": (("ham",), {"ham_router": "l2", "ham_threshold": 0.95}),
    "ham-learned": (("ham",), {"ham_router": "learned", "ham_threshold": 0.52}),
    "ham-gva-negeig-sigmoid": (
        ("ham",),
        {
            "num_v_heads": 4,
            "allow_neg_eigval": True,
            "output_gate_activation": "sigmoid",
            "ham_threshold": 0.7,
        },
    ),  # fmt: skip
    "ham-conv1-nogate": (("ham",), {"conv_size": 1, "use_gate": False}),
    "gdn": (("gdn",), {}),
    "attn": (("attn",), {}),
    "attn-window": (("attn",), {"attn": {"num_heads": 2, "num_kv_heads": 1, "window_size": 5}}),
    "mixed": (("ham", "gdn", "attn", "ham"), {}),
    "mixed-tied": (("ham", "gdn", "attn", "ham"), {"tie_word_embeddings": True}),
}


def tiny_args(layer_types=("ham",), **kw) -> ModelArgs:
    base = dict(
        vocab_size=61, hidden_size=32, num_hidden_layers=len(layer_types), num_heads=2,
        head_dim=16, layer_types=list(layer_types), ham_threshold=0.9, attn=ATTN,
        ham_router_hidden=8,
    )  # fmt: skip
    base.update(kw)
    return ModelArgs(**base)


def randomize(model: Model, seed: int = 0) -> Model:
    """Random norm weights (!= 1), sinks and scales, so that tests discriminate real bugs."""
    rng = np.random.default_rng(seed)
    params = dict(tree_flatten(model.parameters()))
    for key, w in params.items():
        name = key.split(".")[-2] if key.endswith("weight") else key.split(".")[-1]
        if "norm" in name:
            params[key] = mx.array(rng.uniform(0.5, 1.5, w.shape).astype(np.float32))
        elif key.endswith("attn_sink"):
            params[key] = mx.array(rng.normal(0, 1, w.shape).astype(np.float32))
        elif key.endswith("attn_log_scale"):
            params[key] = w + mx.array(rng.normal(0, 0.3, w.shape).astype(np.float32))
    model.update(tree_unflatten(list(params.items())))
    mx.eval(model.parameters())
    return model


def make_model(layer_types=("ham",), seed=0, **kw) -> Model:
    mx.random.seed(seed)
    return randomize(Model(tiny_args(layer_types, **kw)), seed)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
