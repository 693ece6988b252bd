"""mlx-lm's own generation loop drives ham_mlx models (issue: mlx-lm interop)."""

import ham_mlx  # noqa: F401

# isort: split
import json
import shutil

import pytest

from ham_mlx.generate import stream_generate
from ham_mlx.interop import load_hf_tokenizer, mlx_lm_tokenizer
from ham_mlx.model_io import default_model_path, load
from ham_mlx.presets import init_model
from ham_mlx.tokenizer import Tokenizer

mlx_lm_generate = pytest.importorskip("mlx_lm.generate")
pytest.importorskip("transformers")

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
