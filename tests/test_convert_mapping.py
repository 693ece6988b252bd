"""Config and weight mapping: what converts, and what is refused by name (never dropped)."""

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ham_mlx import load_model
from ham_mlx.convert import ConversionError, convert
from ham_mlx.convert.safetensors_io import read_safetensors, write_safetensors
from ham_mlx.model_io import read_weights

FLA = Path(__file__).parent / "fixtures" / "fla"


def fla_copy(tmp_path, name="gdn") -> Path:
    dst = tmp_path / f"src-{name}"
    shutil.copytree(FLA / name, dst, ignore=shutil.ignore_patterns("oracle.safetensors"))
    return dst


def edit_config(src: Path, drop=(), **kw) -> None:
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(kw)
    for k in drop:
        cfg.pop(k)
    (src / "config.json").write_text(json.dumps(cfg))


def edit_weights(src: Path, fn) -> None:
    file = src / "model.safetensors"
    arrays = {k: np.array(t.numpy()) for k, t in read_safetensors(file).items()}
    fn(arrays)
    write_safetensors(file, arrays)


CONFIG_ERRORS = {
    "model type": ({"model_type": "mamba2"}, r"model_type='mamba2' is not supported"),
    "attnres": ({"attnres_block_size": 4}, r"attnres_block_size=4 is not supported: attention"),
    "hidden_act": ({"hidden_act": "powlu"}, r"hidden_act='powlu' is not supported"),
    "unknown key": ({"use_forget_gate": True}, r"unknown config key\(s\) \['use_forget_gate'\]"),
    "ham field in FLA": ({"ham_router": "l2"}, r"unknown config key\(s\) \['ham_router'\]"),
    "conv_bias": ({"conv_bias": True}, r"conv_bias=True"),
    "bad value": ({"num_v_heads": 3}, r"num_v_heads=3"),
    "no short conv": ({"use_short_conv": False}, r"use_short_conv"),
    "qkv bias": ({"attn": {"layers": [1], "num_heads": 4, "qkv_bias": True}},
                 r"attn.qkv_bias=True is not supported"),
    "attn without layers": ({"attn": {"num_heads": 4}}, r"FLA needs attn.layers"),
    "layers not an int": ({"num_hidden_layers": "2"}, r"num_hidden_layers='2'"),
    "attn specs differ": (
        {"attn": [{"layers": [0], "num_heads": 4}, {"layers": [1], "num_heads": 2}]},
        r"attn: 2 attention specifications with different settings",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_config_errors_name_the_key(tmp_path, case):
    src = fla_copy(tmp_path)
    change, pattern = CONFIG_ERRORS[case]
    edit_config(src, **change)
    with pytest.raises(ConversionError, match=r"config.json: .*" + pattern):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_attn_spec_list_with_one_setting_is_merged(tmp_path):
    src = fla_copy(tmp_path, "hybrid")
    spec = {"num_heads": 4, "num_kv_heads": 2, "qkv_bias": False, "rope_theta": 10000.0,
            "window_size": None}  # fmt: skip
    edit_config(src, attn=[{**spec, "layers": [1]}], num_hidden_layers=3)
    convert(src, tmp_path / "a")
    convert(FLA / "hybrid", tmp_path / "b")
    assert (tmp_path / "a" / "config.json").read_text() == (
        tmp_path / "b" / "config.json"
    ).read_text()


def add(key, value):
    return lambda w: w.__setitem__(key, value)


def remove(key):
    return lambda w: w.pop(key)


WEIGHT_ERRORS = {
    "conv bias": (add("model.layers.0.attn.q_conv1d.bias", np.zeros(32, np.float32)),
                  r"'model.layers.0.attn.q_conv1d.bias': short-convolution biases"),
    "unknown": (add("model.layers.0.attn.mystery.weight", np.zeros(3, np.float32)),
                r"tensor 'model.layers.0.attn.mystery.weight': unknown parameter"),
    "attnres": (add("model.layers.0.attn_res_proj.weight", np.zeros((1, 64), np.float32)),
                r"attention residuals"),
    "missing": (remove("model.layers.1.mlp.up_proj.weight"),
                r"missing parameter 'model.layers.1.mlp.up_proj.weight'"),
    "shape": (add("model.layers.0.attn.A_log", np.zeros(3, np.float32)),
              r"'model.layers.0.attn.A_log': shape \(3,\), the config needs \(2,\)"),
    "int dtype": (add("model.norm.weight", np.ones(64, np.int32)),
                  r"'model.norm.weight': dtype I32, expected a floating-point type"),
    "ham params in a gdn layer": (
        add("model.layers.1.attn.kv_gate_proj.weight", np.zeros((2, 64), np.float32)),
        r"layer 1 has ham parameters but the config says it is 'gdn'",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(WEIGHT_ERRORS))
def test_weight_errors_name_the_tensor(tmp_path, case):
    src = fla_copy(tmp_path)
    fn, pattern = WEIGHT_ERRORS[case]
    edit_weights(src, fn)
    with pytest.raises(ConversionError, match=pattern):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_layer_kinds_must_match_the_config(tmp_path):
    src = fla_copy(tmp_path, "hybrid")
    edit_config(src, attn={"layers": [0], "num_heads": 4, "num_kv_heads": 2})
    with pytest.raises(ConversionError, match="layer 0 has gdn parameters .* 'attn'"):
        convert(src, tmp_path / "out")


def test_tied_head_dropped_only_when_equal(tmp_path):
    src = fla_copy(tmp_path, "negeig_tied_sigmoid")
    edit_weights(src, lambda w: w.__setitem__("lm_head.weight", w["model.embeddings.weight"]))
    convert(src, tmp_path / "ok")
    assert "lm_head.weight" not in read_weights(tmp_path / "ok")
    edit_weights(src, lambda w: w.__setitem__("lm_head.weight", w["lm_head.weight"] + 1))
    with pytest.raises(ConversionError, match="lm_head.weight differs from"):
        convert(src, tmp_path / "bad")
    src = fla_copy(tmp_path, "gdn")  # untied: the head must be there
    edit_weights(src, remove("lm_head.weight"))
    with pytest.raises(ConversionError, match="missing parameter 'lm_head.weight'"):
        convert(src, tmp_path / "bad")


def test_ham_folder_converts_again(tmp_path):
    """A ham_mlx folder (model_type "ham", MLX conv layout) is a valid source, e.g. to cast or
    quantize it; the result equals the original."""
    convert(FLA / "hybrid", tmp_path / "once")
    convert(tmp_path / "once", tmp_path / "twice")
    a, b = read_weights(tmp_path / "once"), read_weights(tmp_path / "twice")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]), err_msg=k)
    assert load_model(tmp_path / "twice").args.layer_types == ["gdn", "attn", "gdn"]
