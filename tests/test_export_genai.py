"""The onnxruntime-genai folder: stock onnxruntime-genai (PyPI) generates what MLX generates."""

import ham_mlx  # noqa: F401

# isort: split
import json

import numpy as np
import pytest

from ham_mlx import load, stream_generate
from ham_mlx.export import export_onnx
from ham_mlx.presets import init_model

og = pytest.importorskip("onnxruntime_genai")
PROMPTS = ["To be, or not to be", "O Romeo, Romeo!\nwherefore art thou"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    models = tmp_path_factory.mktemp("genai")
    folder = init_model(models / "tiny-hybrid", "tiny-hybrid", seed=1)
    out = export_onnx(folder, models / "onnx", genai=True, context_length=128).path
    return load(folder), out


def genai_generate(model, rows: list[list[int]], max_length: int) -> list[list[int]]:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False, batch_size=len(rows))
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(rows, dtype=np.int32))
    out = [[] for _ in rows]
    while not gen.is_done():
        gen.generate_next_token()
        for b, t in enumerate(gen.get_next_tokens()):
            out[b].append(int(t))
    return out


def mlx_greedy(model, tok, ids, n):
    return [r.token for r in stream_generate(model, tok, ids, max_tokens=n)]


def test_folder_layout(setup):
    _, out = setup
    names = {f.name for f in out.iterdir()}
    assert {"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json",
            "tokenizer_config.json"} <= names  # fmt: skip
    config = json.loads((out / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True
    assert (
        config["model"]["decoder"]["inputs"]["past_conv_names"] == "past_key_values.%d.conv_state"
    )


def test_genai_generates_like_mlx(setup):
    (model, tok), out = setup
    gm = og.Model(str(out))
    gtok = og.Tokenizer(gm)
    gtok.update_options(add_special_tokens="true")  # genai's encode leaves out BOS by default
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        assert [int(t) for t in gtok.encode(prompt)] == ids
        got = genai_generate(gm, [ids], len(ids) + 80)[0]
        ref = mlx_greedy(model, tok, ids, 80)
        assert len(ref) >= 64 and got[: len(ref)] == ref
        assert gtok.decode(np.array(ids, dtype=np.int32)) == prompt


def test_genai_batch_of_two(setup):
    (model, tok), out = setup
    gm = og.Model(str(out))
    rows = [tok.encode(p)[:6] for p in PROMPTS]
    got = genai_generate(gm, rows, 6 + 70)
    for b, ids in enumerate(rows):
        ref = mlx_greedy(model, tok, ids, 70)
        assert got[b][: len(ref)] == ref
