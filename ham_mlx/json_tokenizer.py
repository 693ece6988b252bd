"""Hugging Face `tokenizer.json` tokenizers (BPE with byte fallback, byte-level BPE, Unigram, ...)
through the `tokenizers` library, with the interface of `ham_mlx.tokenizer.Tokenizer`.

The folder's `tokenizer_config.json` names the special tokens (`bos_token`, `eos_token`,
`pad_token`: a string or {"content": ...}); without an `eos_token` there, `config.json`'s
`eos_token_id` is the end of a reply. `bos_id` is the BOS that `encode` puts first: the one
`tokenizer_config.json`'s `add_bos_token` asks for, else the one the tokenizer's own
post-processor adds (a byte-level BPE such as GPT-2's usually adds none, and then `bos_id` is
None). Decoding drops special tokens, as SentencePiece drops its control pieces.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

HF_TOKENIZER = "tokenizer.json"
HF_CONFIG = "tokenizer_config.json"
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character that stands for each byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def ends_inside_character(data: bytes) -> bool:
    """Whether UTF-8 data ends with the first bytes of a character whose last bytes are missing
    (a stray continuation byte is not such a start: it stays invalid whatever follows)."""
    for back in range(1, min(4, len(data)) + 1):
        lead = data[-back]
        if lead & 0xC0 != 0x80:  # ASCII or the first byte of a character
            size = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if (
                lead >> 3 == 0b11110) else 1  # fmt: skip
            return back < size
    return False


def _token_text(config: dict[str, Any], key: str) -> str | None:
    token = config.get(key)
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) and token else None


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return data


def _uses(part: dict[str, Any] | None, kind: str) -> bool:
    """Whether a tokenizer.json component (possibly a Sequence) contains a `kind` step."""
    if not isinstance(part, dict):
        return False
    if part.get("type") == kind:
        return True
    steps = part.get("decoders") or part.get("pretokenizers") or []
    return any(_uses(s, kind) for s in steps)


class JsonTokenizer:
    """A `tokenizer.json` tokenizer. Build it with `from_folder`."""

    def __init__(
        self, tok, bos_id: int | None, eos_id: int | None, pad_id: int | None,
        byte_level: bool, byte_fallback: bool, source: str = HF_TOKENIZER,
    ):  # fmt: skip
        self._tok = tok  # a tokenizers.Tokenizer
        self.source = source
        self._bos, self._eos, self._pad = bos_id, eos_id, pad_id
        self._byte_level = byte_level
        self._byte_fallback = byte_fallback
        vocab = tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1
        added = tok.get_added_tokens_decoder()
        self.special_tokens = {t.content: i for i, t in sorted(added.items()) if t.special}
        self._alphabet = byte_level_alphabet() if byte_level else {}

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str]) -> JsonTokenizer:
        """Load `tokenizer.json` and the special tokens of `tokenizer_config.json`."""
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(folder)
        file = folder / HF_TOKENIZER
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer not found: {file}")
        spec = _read_json(file)
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # the library raises a plain Exception on a malformed file
            raise ValueError(f"{file}: not a tokenizers file ({e})") from None
        config = _read_json(folder / HF_CONFIG)

        def token_id(key: str) -> int | None:
            name = _token_text(config, key)
            if name is None:
                return None
            i = tok.token_to_id(name)
            if i is None:
                raise ValueError(f"{folder / HF_CONFIG}: {key} {name!r} is not in {file.name}")
            return i

        bos, eos, pad = token_id("bos_token"), token_id("eos_token"), token_id("pad_token")
        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, bool):  # the post-processor decides
            probe = tok.encode("a", add_special_tokens=True).ids
            plain = tok.encode("a", add_special_tokens=False).ids
            first = plain[0] if plain else None
            add_bos = len(probe) > len(plain) and probe[0] != first
            if add_bos and bos is None:
                bos = probe[0]
        if eos is None:
            eos_id = _read_json(folder / "config.json").get("eos_token_id")
            eos = eos_id if isinstance(eos_id, int) else None
        model = spec.get("model") or {}
        return cls(
            tok, bos if add_bos else None, eos, pad,
            byte_level=_uses(spec.get("decoder"), "ByteLevel"),
            byte_fallback=bool(model.get("byte_fallback")), source=str(file),
        )  # fmt: skip

    @property
    def vocab_size(self) -> int:
        """One more than the largest token id (added tokens included)."""
        return self._vocab_size

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int | None:
        return self._eos

    @property
    def pad_id(self) -> int | None:
        return self._pad

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, preceded by BOS when `add_bos` and the tokenizer adds one."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self._bos is not None:
            ids.insert(0, self._bos)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids (a list, numpy or mx array); special tokens decode to nothing."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range for vocab_size {self._vocab_size}")
        return self._tok.decode(ids, skip_special_tokens=True)

    def detokenizer(self) -> TextStream:
        """A fresh streaming detokenizer for one generated sequence."""
        return TextStream(self.decode, self._vocab_size, self.token_bytes)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (b"" out of range); a special token's are its name."""
        if not 0 <= token < self._vocab_size:
            return b""
        piece = self._tok.id_to_token(token) or ""
        if piece in self.special_tokens:
            return piece.encode("utf-8")
        if self._byte_level and all(c in self._alphabet for c in piece):
            return bytes(self._alphabet[c] for c in piece)
        byte = BYTE_PIECE.fullmatch(piece) if self._byte_fallback else None
        if byte:
            return bytes([int(byte.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")


class TextStream:
    """Turns generated token ids into text as they arrive, for any `decode`.

    `add_token` returns the text completed by that token; the pieces of `add_token` and
    `finalize` concatenate to exactly `decode(all ids)` whenever that text holds no U+FFFD.
    Text is held back while the bytes of the last tokens (`token_bytes`) end inside a UTF-8
    character whose last bytes are still to come (byte-level BPE, byte-fallback pieces). Each
    step decodes a short window, the tokens of the last step that produced text (the context,
    so that rules that depend on position apply as on the whole sequence) and those after it.

    Invalid UTF-8 is where the stream and `decode` may part: byte fallback decodes a run of
    byte pieces as a whole, and a run that never becomes valid turns into one U+FFFD per byte,
    characters already streamed included; the stream has shown those characters.
    """

    def __init__(
        self, decode: Callable[[list[int]], str], vocab_size: int,
        token_bytes: Callable[[int], bytes],
    ):  # fmt: skip
        self._decode = decode
        self._vocab_size = vocab_size
        self._token_bytes = token_bytes
        self._window: list[int] = []
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
        if ends_inside_character(b"".join(self._token_bytes(t) for t in self._window[-4:])):
            return ""
        return self._emit(len(self._window))

    def finalize(self) -> str:
        """Return whatever is held back (an incomplete character decodes to U+FFFD)."""
        return self._emit(len(self._window))

    def _emit(self, end: int) -> str:
        if end <= self._done:
            return ""
        before = self._decode(self._window[: self._done])
        new = self._decode(self._window[:end])[len(before) :]
        if new:
            del self._window[: self._done]
            end -= self._done
            self._pieces.append(new)
        self._done = end
        return new
