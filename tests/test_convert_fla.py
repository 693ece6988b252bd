"""FLA 0.6.0 as the external oracle: converted FLA checkpoints against FLA's own numbers.

The fixtures in tests/fixtures/fla/ were computed by FLA itself (scripts/make_fla_fixtures.py);
these tests need neither torch nor FLA. Logits of a prefill (chunk kernel for T > 64) and of
single-token decode steps within 2e-4; recurrent states, conv states and attention caches against
FLA's cache, translating its layout: recurrent [B, HV, Dv, Dk] (the same, V-first); conv the last
Kc raw inputs per q/k/v `[B, C, Kc]` where ours keeps the last Kc-1 of q|k|v as `[B, Kc-1, C]`;
attention keys/values `[B, T, Nkv*hd]` after RoPE, the last W with a window where ours keeps W-1.
"""

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from ham_mlx import load_model
from ham_mlx.convert import convert
from ham_mlx.model_io import read_config, read_weights

FIXTURES = Path(__file__).parent / "fixtures" / "fla"
NAMES = sorted(json.loads((FIXTURES / "fixtures.json").read_text())["fixtures"])
TOL = 2e-4


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("fla")
    done = {}

    def get(name):
        if name not in done:
            convert(FIXTURES / name, out / name)
            done[name] = out / name
        return done[name]

    return get


def oracle(name):
    return mx.load(str(FIXTURES / name / "oracle.safetensors"))


def max_err(a, b) -> float:
    return float(np.abs(np.array(a, dtype=np.float64) - np.array(b, dtype=np.float64)).max())


def check_states(model, cache, o, when: str, seen: int) -> list[str]:
    checked = []
    for i, (block, c) in enumerate(zip(model.layers, cache)):
        key = f"{when}.{i}"
        if block.layer_type == "attn":
            k_ours, v_ours = c.state[:2]  # [B, Nkv, fill, hd]
            window = block.attn.window
            assert c.fill == (seen if window is None else min(seen, window - 1))
            for name, ours in (("k", k_ours), ("v", v_ours)):
                fla = np.array(o[f"{key}.attn_state.{name}"])  # [B, T', Nkv * hd]
                assert fla.shape[1] == (seen if window is None else min(seen, window))
                B, N, n, hd = ours.shape
                ours = np.array(ours).transpose(0, 2, 1, 3).reshape(B, n, N * hd)
                assert max_err(ours, fla[:, -n:]) < 1e-4, f"{key} attn {name}"
        else:
            assert max_err(c.ssm, o[f"{key}.recurrent_state"]) < 1e-4, f"{key} recurrent"
            fla = np.concatenate([np.array(o[f"{key}.conv_state.{n}"]) for n in "qkv"], axis=1)
            assert max_err(c.conv, fla[:, :, 1:].transpose(0, 2, 1)) < 1e-5, f"{key} conv"
        checked.append(key)
    return checked


@pytest.mark.parametrize("name", NAMES)
def test_fla_prefill_decode_and_caches(name, converted):
    model = load_model(converted(name))
    o = oracle(name)
    ids, decode_ids = o["input_ids"], o["decode_ids"]
    cache = model.make_cache()
    logits = model(ids, cache)
    assert max_err(logits, o["logits"]) < TOL
    assert check_states(model, cache, o, "prefill", ids.shape[1])
    steps = [model(decode_ids[:, s : s + 1], cache) for s in range(decode_ids.shape[1])]
    assert max_err(mx.concatenate(steps, axis=1), o["decode_logits"]) < TOL
    check_states(model, cache, o, "decode", ids.shape[1] + decode_ids.shape[1])
    # the one-shot forward (no cache) agrees too
    assert max_err(model(mx.concatenate([ids, decode_ids], axis=1))[:, -1], steps[-1][:, 0]) < TOL


def test_fla_bin_and_safetensors_give_identical_weights(converted):
    """FLA's save_pretrained (safetensors, tied head dropped) and torch.save of the same model
    (pytorch_model.bin, lm_head sharing the embeddings' storage)."""
    a, b = converted("negeig_tied_sigmoid"), converted("negeig_tied_sigmoid-bin")
    wa, wb = read_weights(a), read_weights(b)
    assert wa.keys() == wb.keys() and "lm_head.weight" not in wa
    for k in wa:
        assert wa[k].dtype == wb[k].dtype, k
        np.testing.assert_array_equal(np.array(wa[k]), np.array(wb[k]), err_msg=k)
    assert (a / "config.json").read_text() == (b / "config.json").read_text()


def test_fla_config_mapping(converted):
    args = read_config(converted("hybrid"))
    assert args.model_type == "ham" and args.layer_types == ["gdn", "attn", "gdn"]
    assert args.attn["num_kv_heads"] == 2 and args.bos_token_id == 1 and args.pad_token_id is None
    args = read_config(converted("negeig_tied_sigmoid"))
    assert args.allow_neg_eigval and args.tie_word_embeddings and args.conv_size == 3
    assert args.output_gate_activation == "sigmoid"
    args = read_config(converted("window_nogate"))
    assert args.layer_types == ["attn", "gdn"] and args.attn["window_size"] == 12
    assert not args.use_gate
    weights = read_weights(converted("gva"))
    assert weights["model.layers.0.attn.A_log"].shape == (4,)  # HV
    assert weights["model.layers.0.attn.q_conv1d.weight"].shape == (32, 4, 1)  # MLX layout


def mutations(name):
    """Known porting bugs, applied to a loaded model; each must move the logits."""

    def set_weight(key, fn):
        def apply(model):
            params = dict(tree_flatten(model.parameters()))
            model.load_weights([(key, fn(params[key]))], strict=False)

        return apply

    def set_attr(attr, value, layer=0):
        return lambda model: setattr(model.layers[layer].attn, attr, value)

    def config(**kw):
        return kw

    gdn = {
        "flipped conv taps": set_weight("model.layers.0.attn.k_conv1d.weight",
                                        lambda w: w[:, ::-1]),
        "missing o_norm weight": set_weight("model.layers.1.attn.o_norm.weight", mx.ones_like),
        "missing dt_bias": set_weight("model.layers.0.attn.dt_bias", mx.zeros_like),
        "eps 1e-5": config(norm_eps=1e-5),
        "sigmoid instead of SiLU gate": config(output_gate_activation="sigmoid"),
    }  # fmt: skip
    if name == "gdn":
        return gdn
    if name == "negeig_tied_sigmoid":
        return {"beta not doubled": config(allow_neg_eigval=False),
                "SiLU instead of sigmoid gate": config(output_gate_activation="swish")}  # fmt: skip
    if name == "hybrid":
        return {"interleaved RoPE": set_attr("rope", nn.RoPE(16, traditional=True), layer=1)}
    if name == "window_nogate":
        return {"window one too small": set_attr("window", 11),
                "window one too large": set_attr("window", 13)}  # fmt: skip
    return {}


@pytest.mark.parametrize("name", ["gdn", "negeig_tied_sigmoid", "hybrid", "window_nogate"])
def test_fixtures_catch_known_mutations(name, converted, tmp_path):
    """The fixtures discriminate: each mutation moves the logits far beyond the tolerance."""
    o = oracle(name)
    folder = converted(name)
    for label, mutate in mutations(name).items():
        if isinstance(mutate, dict):
            cfg = json.loads((folder / "config.json").read_text())
            mutated = tmp_path / label.replace(" ", "_")
            mutated.mkdir()
            (mutated / "config.json").write_text(json.dumps({**cfg, **mutate}))
            (mutated / "model.safetensors").symlink_to(folder / "model.safetensors")
            model = load_model(mutated)
        else:
            model = load_model(folder)
            mutate(model)
        err = max_err(model(o["input_ids"]), o["logits"])
        print(f"{name}: {label}: {err:.3g}")
        assert err > 50 * TOL, f"{name}: '{label}' moved the logits by only {err:.2e}"
