"""The generation API refuses what it cannot use, by value: token ids that are not integers or
are out of range, prompts that are neither text nor ids, seeds out of range, text that is not
valid Unicode; the CLI says so in one line and exits with status 2."""

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from ham_mlx import generate, load
from ham_mlx.cli import main
from ham_mlx.presets import init_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return init_model(tmp_path_factory.mktemp("models") / "tiny", "tiny-hybrid", seed=1)


@pytest.fixture(scope="module")
def loaded(folder):
    return load(folder)


@pytest.mark.parametrize("prompt, match", [
    ([1, 2.7, 3], r"prompt token 1 is 2.7, not an integer"),
    ([1, True], r"prompt token 1 is True, not an integer"),
    (["5"], r"prompt token 0 is '5', not an integer"),
    ([1, -1], r"prompt token id -1 is out of range"),
    ([10**30], r"prompt token id 10{30} is out of range"),
    (b"hello", r"the prompt is bytes: give text"),
    (bytearray(b"hi"), r"the prompt is bytearray"),
    (7, r"the prompt is a int"),
    ({1, 2}, r"the prompt is a set"),
    (np.array([1.0, 2.0]), r"float64 array; give a 1-d integer array"),
    (mx.array([[1, 2]]), r"2-d .*int32 array"),
    ("to be \udcff or not", r"not valid Unicode: '\\udcff' at character 6 is a lone surrogate"),
    ("", r"the prompt is empty"),
    ([], r"the prompt is empty"),
], ids=["float", "bool", "str-id", "negative", "huge", "bytes", "bytearray", "int", "set",
        "float-array", "2d-array", "surrogate", "empty-text", "empty-ids"])  # fmt: skip
def test_bad_prompts_are_refused_by_value(loaded, prompt, match):
    model, tok = loaded
    with pytest.raises(ValueError, match=match):
        generate(model, tok, prompt, max_tokens=2)


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, "3", True])
def test_seeds_out_of_range_are_refused(loaded, seed):
    model, tok = loaded
    with pytest.raises(ValueError, match=r"seed=.*must be an integer in \[0, 2\*\*64\)"):
        generate(model, tok, "O Romeo", max_tokens=2, temperature=0.8, seed=seed)


def test_integer_ids_of_every_kind_give_the_same_text(loaded):
    model, tok = loaded
    ids = tok.encode("O Romeo, Romeo")
    texts = {generate(model, tok, p, max_tokens=4) for p in (
        ids, tuple(ids), np.array(ids, np.int64), mx.array(ids), [np.int32(i) for i in ids],
    )}  # fmt: skip
    assert len(texts) == 1
    assert generate(model, tok, "x", max_tokens=2, temperature=0.8, seed=2**64 - 1) is not None


def test_cli_seed_out_of_range_is_a_usage_error(folder, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", str(folder), "--prompt", "x", "--temp", "0.8", "--seed", "-1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--seed: must be >= 0, got -1" in err
    assert "Traceback" not in err


def test_cli_undecodable_prompt_is_one_line_and_status_2(folder):
    """Bytes that are not UTF-8 in argv reach Python as lone surrogates."""
    p = subprocess.run(
        [sys.executable, "-m", "ham_mlx.cli", "generate", "--model", str(folder), "--prompt",
         b"caf\xe9 au lait", "--max-tokens", "2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [
        "ham-mlx generate: error: the prompt is not valid Unicode: '\\udce9' at character 3 is a "
        "lone surrogate (undecodable input?)"
    ]


def test_cli_undecodable_stdin_is_one_line_and_status_2(folder):
    p = subprocess.run(
        [sys.executable, "-m", "ham_mlx.cli", "generate", "--model", str(folder), "--prompt", "-",
         "--max-tokens", "2"],
        input=b"caf\xe9 au lait", capture_output=True, timeout=120,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )  # fmt: skip
    assert p.returncode == 2, p.stderr
    assert p.stderr.decode().strip().splitlines() == [
        "ham-mlx generate: error: the prompt on standard input is not utf-8: byte 0xe9 "
        "(invalid continuation byte)"
    ]
