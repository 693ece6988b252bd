"""Model folders: save -> load is bit-exact, sanitize is idempotent, bad input gets clear errors."""

import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_model, tiny_args
from mlx.utils import tree_flatten

from ham_mlx import ModelArgs, Tokenizer, load, load_model, save_model
from ham_mlx.config import ConfigError
from ham_mlx.model_io import MODEL_FILE, MODEL_FILE_SOURCE, CheckpointError, update_folder
from ham_mlx.presets import init_model
from ham_mlx.tokenizer import bundled_tokenizer_path

TOKENIZER = bundled_tokenizer_path()

MIXED = ("ham", "gdn", "attn", "ham")


def flat(model):
    return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}


@pytest.mark.parametrize("shard_bytes", [2**31, 20_000], ids=["single", "sharded"])
def test_save_load_bit_exact(tmp_path, shard_bytes):
    model = make_model(MIXED, ham_router="learned", ham_threshold=[0.4, 0.6], vocab_size=2048)
    model.ham_layers[1].threshold = mx.array(0.625)  # a trained τ travels with the weights
    tok = Tokenizer.from_file(bundled_tokenizer_path())
    save_model(model, tmp_path / "m", tok, max_shard_bytes=shard_bytes)
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    if shard_bytes < 2**31:
        assert "model.safetensors.index.json" in files and len(files) > 4
    loaded, tok2 = load(tmp_path / "m")
    a, b = flat(model), flat(loaded)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert loaded.thresholds() == pytest.approx([0.4, 0.625], abs=1e-7)
    assert loaded.args.layer_types == list(MIXED)
    ids = mx.array([[1, 5, 9, 2, 7]])
    np.testing.assert_array_equal(np.array(model(ids)), np.array(loaded(ids)))
    assert tok2.encode("to be or not") == tok.encode("to be or not")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_sanitize_is_idempotent_and_maps_torch_conv_layout():
    model = make_model(("ham", "attn"), tie_word_embeddings=True)
    weights = dict(tree_flatten(model.parameters()))
    torch_like = dict(weights)
    for k in [k for k in weights if "conv1d" in k]:
        torch_like[k] = weights[k].transpose(0, 2, 1)  # [C, 1, Kc]
    torch_like["lm_head.weight"] = weights["model.embeddings.weight"]
    torch_like["model.layers.1.attn.rotary.inv_freq"] = mx.ones((4,))
    torch_like["model.layers.0.attn.A_log"] = weights["model.layers.0.attn.A_log"].astype(
        mx.float16
    )
    once = model.sanitize(torch_like)
    twice = model.sanitize(once)
    assert once.keys() == twice.keys() == weights.keys()
    for k in once:
        assert once[k].dtype == twice[k].dtype
        np.testing.assert_array_equal(np.array(once[k]), np.array(twice[k]))
    assert once["model.layers.0.attn.A_log"].dtype == mx.float32


def test_unknown_config_keys_warn_and_bad_values_name_the_key():
    params = tiny_args(("ham",)).to_dict()
    with pytest.warns(UserWarning, match="surprise_me"):
        ModelArgs.from_dict({**params, "surprise_me": 1, "fuse_norm": True})
    bad = {
        "layer_types": (["ham", "mamba"], "mamba"),
        "num_v_heads": (3, "num_v_heads"),
        "ham_router": ("psychic", "ham_router"),
        "ham_threshold": ([0.1, 0.2], "ham_threshold"),
        "hidden_size": (0, "hidden_size"),
        "eos_token_id": (10_000, "eos_token_id"),
        "hidden_act": ("powlu", "hidden_act"),
    }
    for key, (value, needle) in bad.items():
        with pytest.raises(ConfigError, match=needle):
            ModelArgs.from_dict({**params, key: value})
    with pytest.raises(ConfigError, match="attn_heads|attn.num_heads"):
        ModelArgs.from_dict({**params, "layer_types": ["attn"], "attn": None})


def write_folder(tmp_path, model):
    return save_model(model, tmp_path / "m")


def test_missing_weight_and_wrong_shape_name_the_key(tmp_path):
    model = make_model(("ham",))
    path = write_folder(tmp_path, model)
    weights = mx.load(str(path / "model.safetensors"))
    del weights["model.layers.0.attn.kv_norm.weight"]
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    with pytest.raises(CheckpointError, match="kv_norm.weight"):
        load_model(path)
    weights["model.layers.0.attn.kv_norm.weight"] = mx.ones((7,))
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    with pytest.raises(CheckpointError, match=r"kv_norm.weight.*\(7,\)"):
        load_model(path)


def test_bad_files_name_the_file(tmp_path):
    model = make_model(("ham",))
    path = write_folder(tmp_path, model)
    (path / "model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(path)
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path / "nowhere")
    cfg = model.args.to_dict()
    (path / "config.json").write_text(json.dumps({**cfg, "layer_types": ["rwkv"]}))
    with pytest.raises(CheckpointError, match="rwkv"):
        load_model(path)


def test_out_of_range_token_id_is_refused():
    model = make_model(("ham",))
    with pytest.raises(ValueError, match="token id 61 is out of range"):
        model(mx.array([[1, 2, 61]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(mx.array([[-1, 2]]))
    with pytest.raises(ValueError, match="empty"):
        model(mx.zeros((1, 0), dtype=mx.int32))


def test_folders_write_mixer_types_and_the_mlx_lm_module(tmp_path):
    """config.json has the mixers under `mixer_types` (transformers validates `layer_types`) and
    `model_file` naming the folder's module for mlx-lm; every writer goes through save_model."""
    model = make_model(MIXED)
    path = save_model(model, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    assert config["mixer_types"] == list(MIXED) and "layer_types" not in config
    assert config["model_file"] == MODEL_FILE == "ham_model.py"
    assert (path / MODEL_FILE).read_text() == MODEL_FILE_SOURCE
    assert "from ham_mlx.mlx_lm_model import Model, ModelArgs" in MODEL_FILE_SOURCE
    assert load_model(path).args.layer_types == list(MIXED)
    args = model.args
    assert ModelArgs.from_dict(args.to_config()) == ModelArgs.from_dict(args.to_dict()) == args
    hybrid = init_model(tmp_path / "hybrid", "tiny-hybrid")
    assert json.loads((hybrid / "config.json").read_text())["mixer_types"] == [
        "ham", "gdn", "attn", "ham"
    ]  # fmt: skip
    assert (hybrid / MODEL_FILE).is_file()


def test_mlx_lm_loader_keys_are_dropped_silently():
    quant = {"group_size": 64, "bits": 4}
    params = {**tiny_args(("ham",)).to_config(), "model_file": "ham_model.py",
              "quantization_config": quant, "quantize_activations": False}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        args = ModelArgs.from_dict(params)
    assert args.extra == {} and "model_file" not in args.to_config()


def old_key_folder(tmp_path) -> Path:
    """A folder as ham_mlx wrote it before the rename: `layer_types`, no model_file."""
    model = make_model(MIXED, vocab_size=2048)
    path = save_model(model, tmp_path / "old", Tokenizer.from_file(TOKENIZER))
    config = json.loads((path / "config.json").read_text())
    config = {("layer_types" if k == "mixer_types" else k): v for k, v in config.items()}
    del config["model_file"]
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / MODEL_FILE).unlink()
    return path


def test_old_key_folder_reads_with_one_deprecation_line(tmp_path, caplog):
    path = old_key_folder(tmp_path)
    with caplog.at_level(logging.WARNING, logger="ham_mlx"):
        model, _ = load(path)
        load_model(path)  # once per folder and process
    assert model.args.layer_types == list(MIXED)
    [record] = [r for r in caplog.records if r.name == "ham_mlx"]
    message = record.getMessage()
    assert str(path / "config.json") in message and "'mixer_types'" in message
    assert "\n" not in message
    # what a user sees: one line on stderr
    code = f"import ham_mlx; ham_mlx.load_model({str(path)!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip().splitlines() == [message], r.stderr


def test_old_key_folder_converts_and_updates(tmp_path, caplog):
    from ham_mlx.convert.pipeline import convert

    path = old_key_folder(tmp_path)
    convert(path, tmp_path / "converted")
    assert json.loads((tmp_path / "converted" / "config.json").read_text())["mixer_types"] == list(
        MIXED
    )
    assert (tmp_path / "converted" / MODEL_FILE).is_file()
    before = flat(load_model(path))
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    del tok_config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    assert update_folder(path) == ["config.json", MODEL_FILE, "tokenizer_config.json"]
    assert update_folder(path) == []
    config = json.loads((path / "config.json").read_text())
    assert config["mixer_types"] == list(MIXED) and config["model_file"] == MODEL_FILE
    assert "chat_template" in json.loads((path / "tokenizer_config.json").read_text())
    caplog.clear()
    after = flat(load_model(path))
    assert not [r for r in caplog.records if r.name == "ham_mlx"]
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)


def test_mixer_types_and_an_old_key_that_disagree_are_refused(tmp_path):
    path = save_model(make_model(MIXED), tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["layer_types"] = ["ham", "ham", "ham", "ham"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="layer_types=.*disagrees with mixer_types"):
        load_model(path)
    config["layer_types"] = list(MIXED)  # the same list under both keys reads
    (path / "config.json").write_text(json.dumps(config))
    assert load_model(path).args.layer_types == list(MIXED)
