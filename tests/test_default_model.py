"""The small trained model shipped in the package loads and generates with no --model."""

import json

import mlx.core as mx

from ham_mlx import generate, load
from ham_mlx.cli import main
from ham_mlx.hf_tokenizer import CHAT_TEMPLATE
from ham_mlx.model_io import MODEL_FILE, MODEL_FILE_SOURCE, default_model_path


def test_default_model_is_bundled_and_generates(capsys):
    path = default_model_path()
    config = json.loads((path / "config.json").read_text())
    assert config["mixer_types"] == ["ham"] * 4 and config["ham_kv_target"] == [0.1] * 4
    assert "layer_types" not in config  # transformers validates that key (see ham_mlx.config)
    assert config["model_file"] == MODEL_FILE
    assert (path / MODEL_FILE).read_text() == MODEL_FILE_SOURCE
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == CHAT_TEMPLATE
    model, tokenizer = load()
    assert model.model.embeddings.weight.dtype == mx.float16
    assert model.layers[0].attn.A_log.dtype == mx.float32  # kept in fp32
    text = generate(model, tokenizer, "ROMEO:", max_tokens=24)
    assert len(text.strip()) > 0
    assert main(["generate", "--prompt", "JULIET:", "--max-tokens", "12"]) == 0
    err = capsys.readouterr().err
    assert "admitted" in err and "generation" in err
