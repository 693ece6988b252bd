"""Folders with a Hugging Face `tokenizer.json` and no `tokenizer.model`: three kinds of tokenizer,
trained here with the `tokenizers` library (BPE with byte fallback as SentencePiece writes it, a
byte-level BPE as GPT-2 has, a Unigram with Metaspace), load, round-trip, stream, and generate
through `ham-mlx generate` with `tokenizer_config.json`'s chat template and special tokens."""

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split

import json
import random
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from ham_mlx import load
from ham_mlx.generate import stream_generate
from ham_mlx.hf_tokenizer import write_hf_tokenizer
from ham_mlx.json_tokenizer import JsonTokenizer
from ham_mlx.model import Model
from ham_mlx.model_io import CheckpointError, save_model
from ham_mlx.presets import preset_args
from ham_mlx.tokenizer import Tokenizer, bundled_tokenizer_path

tokenizers = pytest.importorskip("tokenizers")

WORDS = ("the king queen castle sword river night morning light shadow we shall go forth and "
         "speak hear me").split()  # fmt: skip
UNICODE = "Hear me,  the king\tcafé naïve 東京 🙂!\n  two lines\n"
TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
KINDS = ["bpe-byte-fallback", "byte-level-bpe", "unigram"]


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    return [
        " ".join(r.choice(WORDS) for _ in range(r.randint(3, 12))).capitalize()
        + r.choice([".", "!", "?", ", café.", " naïve"])
        for _ in range(n)
    ]


def byte_level_bpe(folder: Path) -> None:
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    ))  # fmt: skip
    tok.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "<|endoftext|>", "chat_template": TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def unigram(folder: Path) -> None:
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HF(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(corpus(), trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>",
        show_progress=False,
    ))  # fmt: skip
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": True,
              "chat_template": TEMPLATE}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def bpe_byte_fallback(folder: Path) -> None:
    """SentencePiece BPE with byte fallback as tokenizer.json (Llama's layout), without the
    .model file; the chat template is the one ham_mlx writes."""
    write_hf_tokenizer(bundled_tokenizer_path(), folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("json-tok")
    build = {"bpe-byte-fallback": bpe_byte_fallback, "byte-level-bpe": byte_level_bpe,
             "unigram": unigram}  # fmt: skip
    out = {}
    for kind in KINDS:
        folder = root / kind
        folder.mkdir()
        build[kind](folder)
        tok = JsonTokenizer.from_folder(folder)
        mx.random.seed(0)
        model = Model(preset_args("tiny", tok.vocab_size))
        mx.eval(model.parameters())
        save_model(model, root / "model", tokenizer=None)
        for f in (root / "model").iterdir():
            f.rename(folder / f.name)
        (root / "model").rmdir()
        assert not (folder / "tokenizer.model").exists()
        out[kind] = folder
    return out


def texts(kind: str) -> list[str]:
    """Text each kind reproduces exactly: the Unigram one has no byte fallback, so only its own
    alphabet (and single spaces) round-trip."""
    lines = corpus(20, seed=1)
    return [" ".join(lines)] if kind == "unigram" else [UNICODE, *lines, "東京🙂é"]


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(folders, kind):
    tok = load(folders[kind])[1]
    assert isinstance(tok, JsonTokenizer)
    for text in texts(kind):
        assert tok.decode(tok.encode(text)) == text
    if kind == "bpe-byte-fallback":  # the same ids as the SentencePiece model it came from
        sp = Tokenizer.from_file(bundled_tokenizer_path())
        assert tok.encode(UNICODE) == sp.encode(UNICODE) and tok.vocab_size == sp.vocab_size
        assert all(tok.token_bytes(i) == sp.token_bytes(i) for i in range(sp.vocab_size))
        assert tok.special_tokens == sp.special_tokens | {"<unk>": 1}


def test_special_tokens(folders):
    bf, bl, ug = (load(folders[k])[1] for k in KINDS)
    assert (bf.bos_id, bf.eos_id, bf.pad_id) == (2, 3, 0)
    assert bl.bos_id is None and bl.eos_id == bl.special_tokens["<|endoftext|>"]
    assert bl.encode("Hear me")[0] != bl.special_tokens["<|endoftext|>"]
    assert (ug.bos_id, ug.eos_id) == (1, 2) and ug.encode("Hear me")[0] == 1
    assert ug.decode([1, *ug.encode("Hear me", add_bos=False), 2]) == "Hear me"


@pytest.mark.parametrize("kind", ["bpe-byte-fallback", "byte-level-bpe"])
def test_token_bytes_spell_the_text(folders, kind):
    tok = load(folders[kind])[1]
    ids = tok.encode(UNICODE, add_bos=False)
    spelled = b"".join(tok.token_bytes(i) for i in ids)
    prefix = b" " if kind == "bpe-byte-fallback" else b""  # SentencePiece's dummy prefix
    assert spelled == prefix + UNICODE.encode()


def sequences(tok: JsonTokenizer, kind: str, n: int = 300) -> list[list[int]]:
    """Random id sequences, rich in byte tokens and in pieces of multi-byte characters."""
    r = random.Random(7)
    encoded = [tok.encode(t, add_bos=False) for t in texts(kind)]
    pool = sorted({i for ids in encoded for i in ids} | set(tok.special_tokens.values()))
    out = [ids for ids in encoded]
    for _ in range(n):
        source = r.choice(encoded)
        at = r.randrange(len(source))
        seq = source[at : at + r.randint(1, 20)]
        seq += [r.choice(pool) if r.random() < 0.7 else r.randrange(tok.vocab_size)
                for _ in range(r.randint(0, 8))]  # fmt: skip
        out.append(r.sample(seq, len(seq)) if r.random() < 0.3 else seq)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_stream_equals_decode(folders, kind):
    """The streamed pieces concatenate to decode(all ids), and a character is never cut.
    (Byte fallback: for text that is valid UTF-8; random byte runs often are not, and decode
    turns a whole invalid run into U+FFFD.)"""
    tok = load(folders[kind])[1]
    exact = 0
    for seq in sequences(tok, kind):
        detok = tok.detokenizer()
        pieces = [detok.add_token(i) for i in seq] + [detok.finalize()]
        assert "".join(pieces) == detok.text
        if kind != "bpe-byte-fallback" or "\ufffd" not in tok.decode(seq):
            assert "".join(pieces) == tok.decode(seq), seq
            exact += 1
    assert exact > 150  # of 300 + the encoded texts
    text = texts(kind)[-1] + " and more"
    detok = tok.detokenizer()
    pieces = [detok.add_token(i) for i in tok.encode(text, add_bos=False)]
    assert "".join(pieces) + detok.finalize() == text
    assert "".join(pieces) and all("\ufffd" not in p for p in pieces)
    with pytest.raises(ValueError, match=f"token id {tok.vocab_size} is out of range"):
        tok.detokenizer().add_token(tok.vocab_size)


@pytest.mark.parametrize("kind", KINDS)
def test_primed_stream_returns_only_the_reply(folders, kind):
    """The server primes a stream with the prompt's last tokens and drops their text: a prompt
    that ends in multi-byte characters must not leak into the reply."""
    tok = load(folders[kind])[1]
    prompt = tok.encode(texts(kind)[-1])
    reply = tok.encode(" and more", add_bos=False)
    detok = tok.detokenizer()
    for i in prompt[-4:]:
        detok.add_token(i)
    text = "".join(detok.add_token(i) for i in reply) + detok.finalize()
    assert text == tok.decode(prompt + reply)[len(tok.decode(prompt)) :]


def run_generate(folder: Path, *args: str) -> str:
    cmd = [sys.executable, "-m", "ham_mlx.cli", "generate", "--model", str(folder),
           "--max-tokens", "24", *args]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return run.stdout.removesuffix("\n")


@pytest.mark.parametrize("kind", KINDS)
def test_generate_cli(folders, kind):
    """`ham-mlx generate` on the folder prints the text of the generated ids, and a system
    prompt goes through the folder's chat template."""
    model, tok = load(folders[kind])
    steps = list(stream_generate(model, tok, "Hear me", max_tokens=24))
    ids = [s.token for s in steps if s.token is not None and s.token != tok.eos_id]
    assert "".join(s.text for s in steps) == tok.decode(ids)
    assert run_generate(folders[kind], "--prompt", "Hear me") == tok.decode(ids)
    if kind == "bpe-byte-fallback":
        return  # its template is the plain User:/Assistant: one, which stops at "\nUser:"
    prompt = "<|system|>Be brief.\n<|user|>Hear me\n<|assistant|>"
    want = "".join(s.text for s in stream_generate(model, tok, prompt, max_tokens=24))
    got = run_generate(folders[kind], "--system-prompt", "Be brief.", "--prompt", "Hear me")
    assert got == want


def test_bad_folders_name_the_file(folders, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for f in folders["byte-level-bpe"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: eos_token '<eos>' is not in"):
        load(folder)
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"tokenizer.json: not a tokenizers file"):
        load(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"no tokenizer.model and no tokenizer.json"):
        load(folder)


@pytest.mark.parametrize(
    "kind", [pytest.param("bpe-byte-fallback", marks=pytest.mark.slow), "byte-level-bpe"]
)
def test_serve_streams_the_same_text(folders, tmp_path, kind):
    """`ham-mlx serve` on the folder: streamed and whole completions equal generate's text,
    logprobs name each token, and chat goes through the folder's template."""
    for module in ("fastapi", "uvicorn", "jinja2", "mlx_lm", "httpx", "openai"):
        pytest.importorskip(module)
    from test_serve import Server

    model, tok = load(folders[kind])
    server = Server(tmp_path / "server.log", "--model", str(folders[kind]), "--model-id", "m")
    try:
        client = server.client()
        ask = dict(model="m", prompt="Hear me", max_tokens=24, temperature=0)
        whole = client.completions.create(**ask, logprobs=1)
        streamed = "".join(c.choices[0].text for c in client.completions.create(**ask, stream=True))
        head = tok.encode("Hear me")
        ids = [s.token for s in stream_generate(model, tok, head, max_tokens=24)]
        ids = ids[: ids.index(tok.eos_id)] if tok.eos_id in ids else ids
        want = tok.decode(head + ids)[len(tok.decode(head)) :]
        assert streamed == whole.choices[0].text == want
        assert len(whole.choices[0].logprobs.tokens) == whole.usage.completion_tokens
        if kind == "byte-level-bpe":
            messages = [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hear me"}]  # fmt: skip
            chat = client.chat.completions.create(
                model="m", messages=messages, max_tokens=24, temperature=0, stream=True
            )
            text = "".join(c.choices[0].delta.content or "" for c in chat if c.choices)
            prompt = "<|system|>Be brief.\n<|user|>Hear me\n<|assistant|>"
            assert text == "".join(s.text for s in stream_generate(model, tok, prompt, 24))
    finally:
        assert server.stop() == 0, server.log.read_text()
