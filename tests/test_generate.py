"""Generation and the CLI, end to end on random-weights model folders."""

import os
import subprocess
import sys

import mlx.core as mx
import pytest

from ham_mlx import generate, load, stream_generate
from ham_mlx.cli import main
from ham_mlx.presets import init_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return init_model(tmp_path_factory.mktemp("models") / "tiny-hybrid", "tiny-hybrid", seed=1)


@pytest.fixture(scope="module")
def loaded(folder):
    return load(folder)


def greedy_without_cache(model, ids, n):
    """Independent twin of the decode loop: recompute the whole sequence every step."""
    ids = list(ids)
    out = []
    for _ in range(n):
        logits = model(mx.array([ids]))[0, -1]
        t = int(mx.argmax(logits).item())
        out.append(t)
        ids.append(t)
    return out


def test_greedy_generation_matches_recomputation(loaded):
    model, tok = loaded
    prompt = "Shall I compare thee to a summer's day?"
    ids = tok.encode(prompt)
    tokens = [
        r.token for r in stream_generate(model, tok, prompt, max_tokens=12, prefill_step_size=5)
    ]
    expected = greedy_without_cache(model, ids, 12)
    eos = tok.eos_id
    if eos in expected:
        expected = expected[: expected.index(eos) + 1]
    assert tokens == expected


def test_stream_pieces_make_the_text_and_carry_statistics(loaded):
    model, tok = loaded
    pieces = list(
        stream_generate(model, tok, "Now is the winter", max_tokens=20, temperature=0.8, seed=3)
    )
    text = "".join(p.text for p in pieces)
    assert text == generate(model, tok, "Now is the winter", max_tokens=20, temperature=0.8, seed=3)
    last = pieces[-1]
    assert last.finish_reason in ("length", "stop")
    assert last.prompt_tokens == len(tok.encode("Now is the winter"))
    assert last.generation_tokens == len(pieces)
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory_gb >= 0
    kinds = [s["type"] for s in last.kv]
    assert kinds == ["ham", "gdn", "attn", "ham"]
    for s in last.kv:
        assert s["seen"] == last.prompt_tokens + last.generation_tokens - 1
    assert "admitted" in last.summary() and "tok/s" in last.summary()


def test_seed_reproducible_and_different_seeds_differ(loaded):
    model, tok = loaded
    kw = dict(max_tokens=16, temperature=1.0, top_p=0.95, top_k=50, min_p=0.01)
    a = generate(model, tok, "O Romeo", seed=7, **kw)
    b = generate(model, tok, "O Romeo", seed=7, **kw)
    c = generate(model, tok, "O Romeo", seed=8, **kw)
    assert a == b and a != c


def test_bad_prompts_are_refused(loaded):
    model, tok = loaded
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, tok, "")
    with pytest.raises(ValueError, match="out of range"):
        generate(model, tok, [1, 2, model.args.vocab_size + 3])


def test_kv_budget_and_cap_on_a_long_generation(loaded):
    model, tok = loaded
    kw = dict(max_tokens=300, temperature=1.0, seed=0)
    last = list(stream_generate(model, tok, "To be, or not to be", kv_budget=0.2, **kw))[-1]
    for f in last.kv_fraction:
        assert abs(f - 0.2) <= 0.03, last.kv
    last = list(stream_generate(model, tok, "To be, or not to be", max_kv_tokens=12, **kw))[-1]
    assert last.generation_tokens == 300
    for s in last.kv:
        if s["type"] == "ham":
            assert s["admitted"] == [12] or s["admitted"][0] < 12


def test_cli_generate_and_info(folder, capsys):
    argv = ["generate", "--model", str(folder), "--prompt", "Friends, Romans", "--max-tokens", "8",
            "--threshold", "0.3,0.7", "--seed", "1", "--temp", "0.7"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr()
    assert out.out.strip() != "" and "admitted" in out.err and "KV" in out.err
    assert main(["info", str(folder)]) == 0
    info = capsys.readouterr().out
    assert "ham gdn attn ham" in info and "parameters" in info
    assert main(["generate", "--model", str(folder), "--prompt", ""]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["info", str(folder.parent / "missing")]) == 2


def test_console_script_init_then_generate(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    exe = [sys.executable, "-m", "ham_mlx.cli"]
    subprocess.run([*exe, "init", str(tmp_path / "m"), "--preset", "tiny"], check=True, env=env)
    run = subprocess.run(
        [*exe, "generate", "--model", str(tmp_path / "m"), "--prompt", "Hi", "--max-tokens", "5"],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    assert "generation 5 tok" in run.stderr
    help_text = subprocess.run([*exe, "generate", "--help"], capture_output=True, text=True).stdout
    assert "--kv-budget" in help_text and "--max-kv-tokens" in help_text
