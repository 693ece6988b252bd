"""mlx-lm's own generation loop drives ham_mlx models (issue: mlx-lm interop), and mlx-lm's and
transformers' own loaders open ham_mlx folders: `mlx_lm.load(folder, trust_remote_code=True)`
through the folder's `model_file`, `transformers.AutoTokenizer.from_pretrained(folder)`, and
folders that `mlx_lm.convert` saved load again. (mlx-lm's console scripts: test_mlx_lm_cli.py.)"""

import ham_mlx  # noqa: F401

# isort: split
import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from ham_mlx.convert.pipeline import convert
from ham_mlx.generate import stream_generate
from ham_mlx.hf_tokenizer import CHAT_TEMPLATE
from ham_mlx.interop import load_hf_tokenizer, mlx_lm_tokenizer
from ham_mlx.mlx_lm_model import Model as MlxLmModel
from ham_mlx.model_io import default_model_path, load, load_model
from ham_mlx.presets import init_model
from ham_mlx.tokenizer import Tokenizer

mlx_lm_generate = pytest.importorskip("mlx_lm.generate")
transformers = pytest.importorskip("transformers")
mlx_lm = pytest.importorskip("mlx_lm")
mlx_lm_convert = pytest.importorskip("mlx_lm.convert")

PRESETS = {"ham": "tiny", "gdn": "tiny-gdn", "attn": "tiny-attn", "hybrid": "tiny-hybrid"}
TEXTS = ["ROMEO: But soft, what light through yonder window breaks?",
         "  two  spaces\n\nnaïve café 🙂", "\n\tTabs,\tnewlines and 東京\n"]  # fmt: skip

PROMPT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind"


def ours(model, tokenizer, prompt, max_tokens, **kw) -> tuple[list[int], str]:
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kw))
    return [r.token for r in responses if r.token is not None], "".join(r.text for r in responses)


def theirs(model, wrapper, prompt, max_tokens, **kw) -> tuple[list[int], str]:
    responses = list(
        mlx_lm_generate.stream_generate(model, wrapper, prompt, max_tokens=max_tokens, **kw)
    )
    return [r.token for r in responses], "".join(r.text for r in responses)


def test_model_folders_carry_hf_tokenizer_files(tmp_path):
    folder = init_model(tmp_path / "m", "tiny-hybrid")
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "</s>" and config["bos_token"] == "<s>"
    assert config["chat_template"] == CHAT_TEMPLATE
    sp = Tokenizer.from_file(folder / "tokenizer.model")
    hf = load_hf_tokenizer(folder)
    for text in (PROMPT, "  two  spaces\n\nnaïve café 🙂"):
        assert hf.encode(text) == sp.encode(text)
        assert hf.decode(sp.encode(text), skip_special_tokens=True) == text


def test_bundled_default_model_has_hf_tokenizer_files():
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (default_model_path() / name).is_file(), name


def test_mlx_lm_stream_generate_gives_our_greedy_tokens():
    model, tokenizer = load()
    wrapper = mlx_lm_tokenizer(default_model_path())
    want_tokens, want_text = ours(model, tokenizer, PROMPT, 48)
    got_tokens, got_text = theirs(model, wrapper, PROMPT, 48)
    assert len(want_tokens) == 48
    assert got_tokens == want_tokens
    assert got_text == want_text


def test_mlx_lm_drives_a_hybrid_with_chunked_prefill_and_ham_controls(tmp_path):
    """All three layer types, a prefill cut into chunks by mlx-lm, and a HAM threshold override
    passed through mlx-lm's `prompt_cache`."""
    folder = init_model(tmp_path / "m", "tiny-hybrid", seed=3)
    model, tokenizer = load(folder)
    wrapper = mlx_lm_tokenizer(folder)
    prompt = tokenizer.encode(PROMPT * 3)
    for threshold in (None, 0.2):
        want, _ = ours(model, tokenizer, prompt, 24, threshold=threshold)
        cache = model.make_cache(threshold=threshold)
        got, _ = theirs(model, wrapper, prompt, 24, prompt_cache=cache, prefill_step_size=16)
        assert got == want, f"threshold={threshold}"


def test_tokenizer_built_in_memory_when_folder_has_only_tokenizer_model(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(default_model_path(), folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    model, tokenizer = load(folder)
    got, _ = theirs(model, mlx_lm_tokenizer(folder), PROMPT, 16)
    assert got == ours(model, tokenizer, PROMPT, 16)[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Every folder kind: the four layer stacks, the bundled model, a folder ham-mlx convert
    wrote (quantized), and one that mlx_lm.convert saved (float16)."""
    root = tmp_path_factory.mktemp("interop")
    out = {kind: init_model(root / kind, preset, seed=1) for kind, preset in PRESETS.items()}
    out["bundled"] = default_model_path()
    convert(out["hybrid"], root / "converted-q8", quantize=True, q_bits=8)
    out["converted-q8"] = root / "converted-q8"
    mlx_lm_convert.convert(str(out["hybrid"]), str(root / "mlx-lm-f16"), dtype="float16",
                           trust_remote_code=True)  # fmt: skip
    out["mlx-lm-f16"] = root / "mlx-lm-f16"
    return out


FOLDER_KINDS = [*PRESETS, "bundled", "converted-q8", "mlx-lm-f16"]


@pytest.mark.parametrize("kind", FOLDER_KINDS)
def test_mlx_lm_load_builds_our_model_with_identical_logits(folders, kind):
    folder = folders[kind]
    model, wrapper = mlx_lm.load(str(folder), trust_remote_code=True)
    assert isinstance(model, MlxLmModel)
    ours = load_model(folder)
    ids = mx.array([Tokenizer.from_file(default_model_path() / "tokenizer.model").encode(TEXTS[0])])
    np.testing.assert_array_equal(np.array(model(ids)), np.array(ours(ids)))
    assert wrapper.has_chat_template and 3 in wrapper.eos_token_ids


def test_mlx_lm_asks_for_trust_remote_code(folders):
    with pytest.raises(ValueError, match="trust_remote_code"):
        mlx_lm.load(str(folders["hybrid"]))


@pytest.mark.parametrize("kind", FOLDER_KINDS)
def test_auto_tokenizer_reads_every_folder_and_equals_sentencepiece(folders, kind):
    folder = folders[kind]
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    sp = Tokenizer.from_file(default_model_path() / "tokenizer.model")
    for text in TEXTS:
        assert hf(text)["input_ids"] == sp.encode(text), text
        assert hf.decode(sp.encode(text), skip_special_tokens=True) == text
    messages = [{"role": "user", "content": "Hello"}]
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids == sp.encode("User: Hello\nAssistant:")


def test_folders_mlx_lm_convert_saved_load_again(folders, tmp_path):
    """mlx_lm.convert (load: sanitize; save: its config and our module) in float16 and 4-bit:
    A_log, dt_bias and threshold stay float32, the small projections stay unquantized, and
    ham_mlx and mlx-lm both load the result."""
    src = folders["hybrid"]
    mlx_lm_convert.convert(str(src), str(tmp_path / "q4"), quantize=True, trust_remote_code=True)
    ids = mx.array([Tokenizer.from_file(src / "tokenizer.model").encode(TEXTS[0])])
    want = np.array(load_model(src)(ids))
    for name, tol in (("mlx-lm-f16", 0.02), ("q4", 1.0)):
        folder = folders[name] if name in folders else tmp_path / name
        config = json.loads((folder / "config.json").read_text())
        assert config["mixer_types"] == ["ham", "gdn", "attn", "ham"]
        assert config["model_file"] == "ham_model.py" and (folder / "ham_model.py").is_file()
        ours = load_model(folder)
        theirs, _ = mlx_lm.load(str(folder), trust_remote_code=True)
        for model in (ours, theirs):
            ham = model.layers[0].attn
            assert ham.A_log.dtype == ham.dt_bias.dtype == ham.threshold.dtype == mx.float32
            assert type(ham.a_proj) is nn.Linear
            got = np.array(model(ids))
            assert np.abs(got - want).max() / np.abs(want).max() < tol, name
        assert (type(ours.layers[0].attn.q_proj) is nn.QuantizedLinear) == (name == "q4")
        np.testing.assert_array_equal(np.array(ours(ids)), np.array(theirs(ids)))
    # mlx-lm saves tokenizer.json, not tokenizer.model: ham_mlx.load reads it
    model, tokenizer = load(tmp_path / "q4")
    assert type(tokenizer).__name__ == "JsonTokenizer"
    assert tokenizer.encode(TEXTS[0]) == ids[0].tolist()
    shutil.copy(src / "tokenizer.model", tmp_path / "q4")
    model, tokenizer = load(tmp_path / "q4")
    assert tokenizer.encode(TEXTS[0]) == ids[0].tolist()
