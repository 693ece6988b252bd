"""Tokens as the API shows them: each token's text and bytes (logprobs), and the /tokenize rules.

A token is shown as the text of its bytes (the tokenizer's `token_bytes`): a SentencePiece piece
with `▁` as a space (`"▁To"` → `" To"`), a byte-fallback piece (`<0xE4>`) as that byte, a
byte-level BPE token as the bytes its characters stand for, a special token as its name. A token
whose bytes are not valid UTF-8 on their own is written as OpenAI does: `"bytes:\\xe4"`.
"""

from __future__ import annotations

from functools import lru_cache

from ham_mlx.json_tokenizer import JsonTokenizer
from ham_mlx.tokenizer import Tokenizer


class TokenTexts:
    """Text and bytes of single tokens of a tokenizer (cached per id)."""

    def __init__(self, tokenizer: Tokenizer | JsonTokenizer):
        self.vocab_size = tokenizer.vocab_size
        self.bytes = lru_cache(maxsize=None)(tokenizer.token_bytes)
        self.text = lru_cache(maxsize=None)(self._text)
        self.specials = tokenizer.special_tokens

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
