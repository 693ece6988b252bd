import random

import pytest

from ham_mlx.tokenizer import Tokenizer, bundled_tokenizer_path, train_tokenizer

TEXTS = {
    "multiline": "First line\nsecond  line\n\n\nthird\tline with\t\ttabs\n",
    "edge_spaces": "   leading and trailing   ",
    "newline_first": "\n  indented\n",
    "accents": "Café naïve façade — “quoted” ﬁ",
    "cjk": "日本語のテキスト 中文",
    "emoji": "🎉🇫🇷 ok 😀😀",
    "one_space": " ",
    "empty": "",
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(bundled_tokenizer_path())


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    detok = tok.detokenizer()
    pieces = [detok.add_token(i) for i in ids] + [detok.finalize()]
    assert detok.text == "".join(pieces)
    return pieces


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, add_bos=False)) == text


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_stream_matches_decode(tok, text):
    ids = tok.encode(text) + [tok.eos_id]
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)  # split characters are held back, not mangled


def test_stream_holds_back_split_character(tok):
    ids = tok.encode("😀", add_bos=False)
    assert len(ids) == 5  # "▁" and four byte-fallback tokens
    pieces = stream(tok, ids)
    assert pieces[:5] == ["", "", "", "", "😀"]


def test_stream_matches_decode_on_random_ids(tok):
    """Arbitrary ids, including broken UTF-8 byte runs and control tokens mid-text."""
    rng = random.Random(0)
    byte_ids = [i for i in range(tok.vocab_size) if tok._sp.is_byte(i)]
    pools = [list(range(tok.vocab_size)), byte_ids + [0, 1, 2, 3, 4, tok._sp.piece_to_id("▁")]]
    for trial in range(2000):
        ids = [rng.choice(pools[trial % 2]) for _ in range(rng.randint(0, 24))]
        assert "".join(stream(tok, ids)) == tok.decode(ids), ids


def test_stream_decodes_a_bounded_window(tok):
    class CountingDecode:
        def __init__(self, sp):
            self.sp, self.longest = sp, 0

        def decode(self, ids):
            self.longest = max(self.longest, len(ids))
            return self.sp.decode(ids)

        def __getattr__(self, name):
            return getattr(self.sp, name)

    ids = tok.encode("To be, or not to be: that is the question. 日本 😀\n" * 50)
    detok = tok.detokenizer()
    detok._sp = counting = CountingDecode(tok._sp)
    text = "".join(detok.add_token(i) for i in ids) + detok.finalize()
    assert text == tok.decode(ids)
    assert counting.longest <= 10


def test_special_ids(tok):
    assert tok.vocab_size == 2048
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    ids = tok.encode("hello")
    assert ids[0] == tok.bos_id and tok.encode("hello", add_bos=False) == ids[1:]
    assert tok.decode([tok.bos_id, *ids[1:], tok.eos_id, tok.pad_id]) == "hello"


def test_decode_rejects_out_of_range_id(tok):
    with pytest.raises(ValueError, match="token id 2048"):
        tok.decode([5, 2048])
    with pytest.raises(ValueError, match="token id -1"):
        tok.detokenizer().add_token(-1)


def test_save_and_from_bytes(tok, tmp_path):
    tok.save(tmp_path / "copy.model")
    copy = Tokenizer.from_bytes((tmp_path / "copy.model").read_bytes())
    assert copy.encode(TEXTS["multiline"]) == tok.encode(TEXTS["multiline"])


def test_missing_model_file_names_the_path(tmp_path):
    path = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer.from_file(path)


@pytest.mark.parametrize("data", [b"", b"this is not a sentencepiece model"], ids=["empty", "text"])
def test_corrupt_model_file_names_the_path(tmp_path, data):
    path = tmp_path / "bad.model"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="bad.model is not a sentencepiece model"):
        Tokenizer.from_file(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat", "über", "naïve", "and", "dog", "ran", "away"]
    folder = tmp_path_factory.mktemp("corpus")
    files = []
    for k in range(2):
        lines = (" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(500))
        path = folder / f"part{k}.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        files.append(str(path))
    return files


def test_train_tokenizer(corpus, tmp_path):
    tok = train_tokenizer(corpus, tmp_path / "small", vocab_size=400)
    assert (tmp_path / "small.model").is_file()
    assert 261 < tok.vocab_size <= 400  # 4 specials, "\n", 256 bytes, and merges
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert len(tok.encode("the cat sat on the mat", add_bos=False)) <= 6  # words were merged
    for text in TEXTS.values():
        assert tok.decode(tok.encode(text)) == text
    train_tokenizer(corpus, tmp_path / "again", vocab_size=400)
    assert (tmp_path / "again.model").read_bytes() == (tmp_path / "small.model").read_bytes()


def test_train_tokenizer_overrides(corpus, tmp_path):
    tok = train_tokenizer(corpus, tmp_path / "nopad", vocab_size=300, pad_id=-1)
    assert tok.pad_id is None and tok.bos_id == 2


def test_train_tokenizer_missing_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer([tmp_path / "missing.txt"], tmp_path / "x")


def test_bundled_tokenizer_is_small():
    path = bundled_tokenizer_path()
    assert path.is_file() and path.stat().st_size < 100_000


def test_chat_template_lays_out_plain_text_lines(tmp_path):
    """The chat template of every folder (hf_tokenizer.CHAT_TEMPLATE): BOS, one line per message
    with its role capitalized, "Assistant:" to ask for the reply; the same text as the built-in
    template of `ham-mlx serve` after the BOS."""
    transformers = pytest.importorskip("transformers")
    from ham_mlx.hf_tokenizer import write_hf_tokenizer

    write_hf_tokenizer(bundled_tokenizer_path(), tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "Bye"},
    ]
    text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    body = "System: You are terse.\nUser: Hello\nAssistant: Hi there\nUser: Bye\nAssistant:"
    assert text == "<s>" + body
    assert hf.apply_chat_template(messages, tokenize=False) == "<s>" + body.removesuffix(
        "Assistant:"
    )
    prefill = [*messages, {"role": "assistant", "content": "Fare"}]
    continued = hf.apply_chat_template(prefill, continue_final_message=True, tokenize=False)
    assert continued == "<s>" + body + " Fare"
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids == Tokenizer.from_file(bundled_tokenizer_path()).encode(body)
    pytest.importorskip("jinja2")
    from ham_mlx.serve.chat import load_chat_template

    assert load_chat_template(tmp_path).render(messages) == body
