"""SentencePiece tokenizer: load, encode/decode, stream text out token by token, train; and
`load_tokenizer`, a model folder's tokenizer (SentencePiece, else `ham_mlx.json_tokenizer`).

Models trained by `train_tokenizer` round-trip exactly: `decode(encode(x)) == x` for any text,
including newlines, runs of spaces, tabs and characters outside the vocabulary (byte fallback).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import sentencepiece as spm

if TYPE_CHECKING:
    from ham_mlx.json_tokenizer import JsonTokenizer

# Settings that make decode(encode(x)) == x exactly on multi-line text: sentencepiece's defaults
# (NFKC, collapsed whitespace, no newline piece) break the round trip.
_EXACT_ROUND_TRIP = dict(
    model_type="bpe",
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    user_defined_symbols=["\n"],
    byte_fallback=True,
    character_coverage=1.0,
    pad_id=0,
    unk_id=1,
    bos_id=2,
    eos_id=3,
)


def bundled_tokenizer_path() -> Path:
    """Path of the tokenizer shipped with the package (see `ham_mlx/assets/TOKENIZER.md`)."""
    return Path(str(resources.files("ham_mlx") / "assets" / "tokenizer.model"))


class Tokenizer:
    """A SentencePiece model. Build it with `from_file` or `from_bytes`."""

    def __init__(self, processor: spm.SentencePieceProcessor, source: str = "tokenizer.model"):
        self._sp = processor
        self.source = source  # the file it was read from, for messages

    @classmethod
    def from_bytes(cls, data: bytes) -> Tokenizer:
        """Load a serialized SentencePiece model (the contents of a `.model` file)."""
        try:
            if not data:
                raise RuntimeError("empty data")
            processor = spm.SentencePieceProcessor(model_proto=bytes(data))
        except RuntimeError as e:
            raise ValueError(f"not a sentencepiece model ({e})") from None
        if processor.vocab_size() == 0:
            raise ValueError("not a sentencepiece model (no pieces)")
        return cls(processor)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a SentencePiece `.model` file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        try:
            tokenizer = cls.from_bytes(path.read_bytes())
            tokenizer.source = str(path)
            return tokenizer
        except ValueError as e:
            raise ValueError(f"{path} is {e}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the serialized model to `path`."""
        Path(path).write_bytes(self._sp.serialized_model_proto())

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def bos_id(self) -> int | None:
        return _optional_id(self._sp.bos_id())

    @property
    def eos_id(self) -> int | None:
        return _optional_id(self._sp.eos_id())

    @property
    def pad_id(self) -> int | None:
        return _optional_id(self._sp.pad_id())

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, preceded by BOS when `add_bos` and the model has one."""
        ids = self._sp.encode(text)
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids (a list, numpy or mx array); BOS/EOS/PAD decode to nothing."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range for vocab_size {self.vocab_size}")
        return self._sp.decode(ids)

    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh streaming detokenizer for one generated sequence."""
        return StreamingDetokenizer(self)

    @property
    def special_tokens(self) -> dict[str, int]:
        """The control pieces (`<s>`, `</s>`, ...) by name."""
        sp = self._sp
        return {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i)}

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (b"" out of range): `▁` is a space, a byte-fallback
        piece (`<0xE4>`) its byte, a control piece its name."""
        if not 0 <= token < self.vocab_size:
            return b""
        piece = self._sp.id_to_piece(token)
        if self._sp.is_byte(token):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")


def load_tokenizer(folder: str | os.PathLike[str]) -> Tokenizer | JsonTokenizer:
    """The tokenizer of a model folder: its SentencePiece `tokenizer.model`, else its Hugging
    Face `tokenizer.json` (with `tokenizer_config.json`'s special tokens)."""
    folder = Path(folder)
    if (folder / "tokenizer.model").is_file():
        return Tokenizer.from_file(folder / "tokenizer.model")
    if (folder / "tokenizer.json").is_file():
        from ham_mlx.json_tokenizer import JsonTokenizer

        return JsonTokenizer.from_folder(folder)
    raise FileNotFoundError(f"{folder}: no tokenizer.model and no tokenizer.json")


def _optional_id(i: int) -> int | None:
    return None if i < 0 else i


def _utf8_length(lead: int) -> int:
    """Bytes in the UTF-8 sequence a byte starts (1 for ASCII, continuation and invalid bytes)."""
    if lead >> 5 == 0b110:
        return 2
    if lead >> 4 == 0b1110:
        return 3
    if lead >> 3 == 0b11110:
        return 4
    return 1


class StreamingDetokenizer:
    """Turns generated token ids into text as they arrive.

    `add_token` returns the text completed by that token. Pieces returned by `add_token` and
    `finalize` concatenate to exactly `tokenizer.decode(all ids)`. A multi-byte character split
    over byte-fallback tokens is held back until its last byte arrives.

    Each step decodes a short window only: the tokens of the last step that produced text (the
    context) and those after it. With that context SentencePiece applies its two rules that
    depend on position (drop the space before the first word; join byte runs into characters)
    exactly as it does on the whole sequence.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._sp = tokenizer._sp
        self._vocab_size = tokenizer.vocab_size
        self._window: list[int] = []  # ids from the last step that produced text on
        self._done = 0  # window[:done]: ids whose text has been returned
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All text returned so far."""
        return "".join(self._pieces)

    def add_token(self, token: int) -> str:
        """Add one token id; return the text it completes (may be "")."""
        token = int(token)
        if not 0 <= token < self._vocab_size:
            raise ValueError(f"token id {token} is out of range for vocab_size {self._vocab_size}")
        self._window.append(token)
        return self._emit(len(self._window) - self._incomplete_bytes())

    def finalize(self) -> str:
        """Return whatever is held back (an incomplete character decodes to U+FFFD)."""
        return self._emit(len(self._window))

    def _incomplete_bytes(self) -> int:
        """How many trailing byte tokens form a UTF-8 character still waiting for bytes."""
        tail = 0
        for token in reversed(self._window[-4:]):
            if not self._sp.is_byte(token):
                return 0
            tail += 1
            byte = int(self._sp.id_to_piece(token)[3:5], 16)  # "<0xE4>"
            if byte & 0xC0 != 0x80:  # the character's first byte
                return tail if tail < _utf8_length(byte) else 0
        return 0

    def _emit(self, end: int) -> str:
        if end <= self._done:
            return ""
        before = self._sp.decode(self._window[: self._done])
        new = self._sp.decode(self._window[:end])[len(before) :]
        if new:  # this step's tokens become the context of the next
            del self._window[: self._done]
            end -= self._done
            self._pieces.append(new)
        self._done = end
        return new


def _lines(files: Sequence[Path]) -> Iterator[str]:
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield line.rstrip("\n")


def train_tokenizer(
    input_files: Sequence[str | os.PathLike[str]],
    model_prefix: str | os.PathLike[str],
    vocab_size: int = 4096,
    **overrides,
) -> Tokenizer:
    """Train a SentencePiece BPE model on UTF-8 text files; write `<model_prefix>.model`.

    Each line is one training sentence; `"\\n"` is a piece of its own. `overrides` replace any
    SentencePiece trainer option. The result depends only on the files' contents and order:
    no paths are stored in the model, so retraining gives the same bytes.
    """
    files = [Path(f) for f in input_files]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"training text not found: {f}")
    options = dict(
        _EXACT_ROUND_TRIP,
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # small corpora give fewer pieces instead of failing
        num_threads=2,
        input_sentence_size=0,  # use every line: no random sampling
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    options.update(overrides)
    spm.set_random_generator_seed(0)  # only matters when overrides ask for sampling
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=_lines(files), model_writer=model, **options)
    out = Path(f"{os.fspath(model_prefix)}.model")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    return Tokenizer.from_bytes(model.getvalue())
