"""tokenizer.json from a SentencePiece model encodes and decodes exactly like it."""

import ham_mlx  # noqa: F401

# isort: split
import json
import random

import pytest

from ham_mlx.hf_tokenizer import build_hf_tokenizer, write_hf_tokenizer
from ham_mlx.tokenizer import Tokenizer, bundled_tokenizer_path, train_tokenizer

TEXTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n",
    " leading space", "two  spaces\tand a tab", "\n\nstarts with newlines", "trailing  ",
    "naïve café, 東京, Ελληνικά, emoji 🙂🚀 and ¿qué?", "",
]  # fmt: skip


@pytest.fixture(scope="module", params=["bundled", "trained"])
def spm_path(request, tmp_path_factory):
    if request.param == "bundled":
        return bundled_tokenizer_path()
    d = tmp_path_factory.mktemp("spm")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(TEXTS[:3] * 20 + ["the quick brown fox jumps over the dog"] * 30))
    train_tokenizer([corpus], d / "tok", vocab_size=300)
    return d / "tok.model"


def test_round_trip_matches_sentencepiece(spm_path):
    sp, hf = Tokenizer.from_file(spm_path), build_hf_tokenizer(spm_path)
    rng = random.Random(0)
    alphabet = "abcdefghij klmnop\n\t  éü東🙂,.;:'\"ABCXYZ0123456789\u00a0"
    texts = TEXTS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
                     for _ in range(500)]  # fmt: skip
    for text in texts:
        ids = sp.encode(text)
        assert hf.encode(text).ids == ids, repr(text)
        assert hf.decode(ids, skip_special_tokens=True) == sp.decode(ids) == text, repr(text)


def test_control_pieces_in_text_are_read_as_tokens():
    """The one documented difference (as in every HF SentencePiece conversion): the text "<s>"
    becomes the BOS token, where SentencePiece spells it out."""
    hf = build_hf_tokenizer(bundled_tokenizer_path())
    assert hf.encode("<s>").ids == [2, 2]
    assert Tokenizer.from_file(bundled_tokenizer_path()).encode("<s>")[1:] != [2]


def test_files(tmp_path):
    paths = write_hf_tokenizer(bundled_tokenizer_path(), tmp_path)
    assert [p.name for p in paths] == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads(paths[1].read_text())
    assert config["bos_token"] == "<s>" and config["eos_token"] == "</s>"
    assert config["add_bos_token"] is True
    from tokenizers import Tokenizer as HF

    hf = HF.from_file(str(paths[0]))
    assert hf.encode(TEXTS[0]).ids == Tokenizer.from_file(bundled_tokenizer_path()).encode(TEXTS[0])


def test_transformers_reads_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    write_hf_tokenizer(bundled_tokenizer_path(), tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    sp = Tokenizer.from_file(bundled_tokenizer_path())
    for text in TEXTS[:6]:
        assert tok(text)["input_ids"] == sp.encode(text)
        assert tok.decode(sp.encode(text), skip_special_tokens=True) == text
