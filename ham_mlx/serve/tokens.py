"""Tokens as the API shows them: each token's text and bytes (logprobs), and the /tokenize rules.

A SentencePiece piece is shown as its text with `▁` as a space (`"▁To"` → `" To"`), a byte-fallback
piece (`<0xE4>`) as that byte, and a control piece (`<s>`, `</s>`) as its name. A token whose
bytes are not valid UTF-8 on their own is written as OpenAI does: `"bytes:\\xe4"`.
"""

from __future__ import annotations

from functools import lru_cache

from ham_mlx.tokenizer import Tokenizer


class TokenTexts:
    """Text and bytes of single tokens of a tokenizer (cached per id)."""

    def __init__(self, tokenizer: Tokenizer):
        # ham_mlx.tokenizer.Tokenizer has no public per-piece API yet: read its SentencePiece.
        self._sp = tokenizer._sp
        self.vocab_size = tokenizer.vocab_size
        self.bytes = lru_cache(maxsize=None)(self._bytes)
        self.text = lru_cache(maxsize=None)(self._text)
        self.specials = {
            self._sp.id_to_piece(i): i for i in range(self.vocab_size) if self._sp.is_control(i)
        }

    def _bytes(self, token: int) -> bytes:
        if not 0 <= token < self.vocab_size:
            return b""
        piece = self._sp.id_to_piece(token)
        if self._sp.is_byte(token):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def _text(self, token: int) -> str:
        data = self.bytes(token)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def tokenize(tokenizer: Tokenizer, texts: TokenTexts, text: str, add_special: bool) -> list[int]:
    """Token ids of text for /tokenize, as transformers encodes with the folder's tokenizer.json:
    special-token names in the text (`</s>`) become their ids; BOS first when add_special."""
    ids: list[int] = [tokenizer.bos_id] if add_special and tokenizer.bos_id is not None else []
    rest = text
    while rest:
        found = [(rest.find(s), s) for s in texts.specials if s and s in rest]
        if not found:
            ids += tokenizer.encode(rest, add_bos=False)
            break
        at, name = min(found, key=lambda f: (f[0], -len(f[1])))
        if at:
            ids += tokenizer.encode(rest[:at], add_bos=False)
        ids.append(texts.specials[name])
        rest = rest[at + len(name) :]
    return ids
