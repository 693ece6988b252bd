"""The onnxruntime-genai folder: stock onnxruntime-genai (PyPI) generates what MLX generates, one
prompt or a batch of prompts of different lengths through genai's own loop (`Tokenizer.
encode_batch`, `Generator.append_tokens`, `generate_next_token`) for every layer type."""

import ham_mlx  # noqa: F401

# isort: split
import json
from functools import partial

import mlx.core as mx
import numpy as np
import pytest
from conftest import LAYER_CONFIGS, make_model
from greedy import is_prefix, onnx_next_logits, tie_aware_greedy

from ham_mlx import load, stream_generate
from ham_mlx.export import export_onnx
from ham_mlx.presets import init_model
from ham_mlx.tokenizer import Tokenizer, bundled_tokenizer_path

og = pytest.importorskip("onnxruntime_genai")
PROMPTS = ["To be, or not to be", "O Romeo, Romeo!\nwherefore art thou"]
BATCH = [  # four lengths: genai pads the shorter ones on the right (genai 0.18 derives its
    # attention_mask from each row's last non-pad token, so it takes right padding only; left
    # padding goes through our runner, tests/test_export_parity.py)
    "To be, or not to be, that is the question",
    "O Romeo",
    "Now is the winter of our discontent made glorious summer by this sun of York",
    "All the world's a stage",
]
NEW = 64  # greedy tokens per row
GENAI_CONFIGS = ["ham-cosine", "ham-l2", "ham-learned", "ham-gva-negeig-sigmoid", "gdn", "attn",
                 "attn-window", "mixed"]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    models = tmp_path_factory.mktemp("genai")
    folder = init_model(models / "tiny-hybrid", "tiny-hybrid", seed=1)
    out = export_onnx(folder, models / "onnx", genai=True, context_length=128).path
    return load(folder), out


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_file(bundled_tokenizer_path())


def genai_loop(model, batch, max_length: int) -> list[list[int]]:
    """genai's own generation loop over a [B, T] batch of token ids (a genai Tensor or numpy)."""
    rows = (batch if isinstance(batch, np.ndarray) else batch.as_numpy()).shape[0]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False, batch_size=rows)
    gen = og.Generator(model, params)
    gen.append_tokens(batch)
    out = [[] for _ in range(rows)]
    while not gen.is_done():
        gen.generate_next_token()
        for b, t in enumerate(gen.get_next_tokens()):
            out[b].append(int(t))
    return out


def alone(model, ids: list[int], n: int, eos: int) -> list[int]:
    """MLX greedy tokens of one prompt alone (up to and with EOS)."""
    cache = model.make_cache()
    logits = model(mx.array([ids]), cache)[:, -1]
    out = []
    for _ in range(n):
        out.append(int(mx.argmax(logits, axis=-1).item()))
        if out[-1] == eos:
            break
        logits = model(mx.array([[out[-1]]]), cache)[:, -1]
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
    inputs = config["model"]["decoder"]["inputs"]
    assert inputs["past_conv_names"] == "past_key_values.%d.conv_state"
    assert inputs["attention_mask"] == "attention_mask"
    assert inputs["position_ids"] == "position_ids"  # the hybrid has an attention layer


def test_genai_generates_like_mlx(setup):
    (model, tok), out = setup
    gm = og.Model(str(out))
    gtok = og.Tokenizer(gm)
    gtok.update_options(add_special_tokens="true")  # genai's encode leaves out BOS by default
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        assert [int(t) for t in gtok.encode(prompt)] == ids
        got = genai_loop(gm, np.array([ids], dtype=np.int32), len(ids) + 80)[0]
        ref = mlx_greedy(model, tok, ids, 80)
        assert len(ref) >= 64 and got[: len(ref)] == ref
        assert gtok.decode(np.array(ids, dtype=np.int32)) == prompt


@pytest.mark.parametrize("name", GENAI_CONFIGS)
def test_encode_batch_rows_equal_each_prompt_alone(name, tokenizer, tmp_path):
    """Mixed lengths through genai's own loop: every row, padded or not, generates the greedy
    tokens of its prompt alone on MLX."""
    layer_types, kw = LAYER_CONFIGS[name]
    model = make_model(layer_types, vocab_size=tokenizer.vocab_size, **kw)
    out = export_onnx(model, tmp_path / "g", tokenizer=tokenizer, genai=True, context_length=128,
                      report=False).path  # fmt: skip
    gm = og.Model(str(out))
    gtok = og.Tokenizer(gm)
    gtok.update_options(add_special_tokens="true")
    batch = gtok.encode_batch(BATCH)
    ids = [tokenizer.encode(p) for p in BATCH]
    padded = batch.as_numpy()
    assert padded.shape == (4, max(map(len, ids)))
    assert [list(r[: len(i)]) for r, i in zip(padded, ids)] == ids  # right padding with 0
    got = genai_loop(gm, batch, padded.shape[1] + NEW)
    for b, prompt in enumerate(ids):
        ref = alone(model, prompt, NEW, tokenizer.eos_id)
        assert got[b][: len(ref)] == ref, (name, b, len(prompt))


def test_quantized_folder_under_genai(tmp_path):
    """genai runs an 8-bit folder (MatMulNBits, GatherBlockQuantized) of the bundled model, and a
    padded batch's rows are the rows generated alone: quantization is per token, never per batch."""
    import warnings

    from ham_mlx.export.runtime import OnnxModel, batch_generate
    from ham_mlx.model_io import default_model_path

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = export_onnx(default_model_path(), tmp_path / "q8", quantize="int8", genai=True,
                          context_length=96, report=False).path  # fmt: skip
    gm = og.Model(str(out))
    gtok = og.Tokenizer(gm)
    gtok.update_options(add_special_tokens="true")
    batch = gtok.encode_batch(BATCH[:3])
    got = genai_loop(gm, batch, batch.as_numpy().shape[1] + 32)
    om, tok = OnnxModel(out), Tokenizer.from_file(out / "tokenizer.model")
    for b, prompt in enumerate(BATCH[:3]):
        alone = batch_generate(om, tok, [prompt], max_tokens=32)[0]
        if got[b][: len(alone)] != alone:  # a near-tie: the batch and the row round differently
            follows = partial(is_prefix, whole=got[b])
            alone = tie_aware_greedy(onnx_next_logits(om, 96), tok.encode(prompt), 32, follows,
                                     tok.eos_id)  # fmt: skip
        assert got[b][: len(alone)] == alone
