"""Pre-tokenized text in a memory-mapped file, and deterministic batches from it or from MQAR.

A token file is `NAME.bin` (raw little-endian uint16 or uint32 ids) with `NAME.json` beside it
(`{"dtype": "uint16", "tokens": N, "vocab_size": V}`). Batches are a pure function of (seed, step):
resuming at a step reproduces the data exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ham_mlx.tokenizer import Tokenizer
from ham_mlx.train.config import DataConfig
from ham_mlx.train.mqar import MQAR


def token_path(path: str | Path) -> Path:
    """NAME.bin for NAME or NAME.bin (NAME may itself contain dots, e.g. data.valid)."""
    path = Path(path)
    return path if path.suffix == ".bin" else path.with_name(path.name + ".bin")


def write_token_file(tokenizer: Tokenizer, texts: Iterable[str], out: str | Path) -> Path:
    """Encode texts (each with BOS and EOS) into `out` (.bin) + its .json sidecar."""
    out = token_path(out)
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    chunks = []
    for text in texts:
        ids = tokenizer.encode(text, add_bos=True)
        if tokenizer.eos_id is not None:
            ids.append(tokenizer.eos_id)
        chunks.append(np.asarray(ids, dtype=dtype))
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".bin.tmp")
    tokens.tofile(tmp)
    tmp.replace(out)
    meta = {
        "dtype": np.dtype(dtype).name,
        "tokens": int(tokens.size),
        "vocab_size": tokenizer.vocab_size,
    }
    out.with_suffix(".json").write_text(json.dumps(meta) + "\n")
    return out


class TokenFile:
    """A memory-mapped token file."""

    def __init__(self, path: str | Path):
        path = token_path(path)
        meta_path = path.with_suffix(".json")
        if not path.is_file() or not meta_path.is_file():
            raise FileNotFoundError(f"token file {path} (with {meta_path.name}) not found")
        meta = json.loads(meta_path.read_text())
        self.tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
        if self.tokens.size != meta["tokens"]:
            raise ValueError(f"{path}: {self.tokens.size} tokens, its .json says {meta['tokens']}")
        self.vocab_size = int(meta["vocab_size"])
        self.path = path

    def batch(self, seed: int, size: int, seq_len: int) -> tuple[np.ndarray, np.ndarray, None]:
        """Random windows: (inputs [size, seq_len], targets shifted by one, no mask)."""
        if self.tokens.size < seq_len + 2:
            raise ValueError(f"{self.path}: {self.tokens.size} tokens, fewer than seq_len + 2")
        rng = np.random.default_rng(seed)
        starts = rng.integers(0, self.tokens.size - seq_len - 1, size)
        rows = np.stack([self.tokens[s : s + seq_len + 1] for s in starts]).astype(np.int32)
        return rows[:, :-1], rows[:, 1:], None


class Batches:
    """Deterministic training and held-out batches for a DataConfig."""

    def __init__(self, cfg: DataConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        if cfg.kind == "mqar":
            self.mqar = MQAR(cfg.mqar_vocab, cfg.mqar_pairs, cfg.seq_len, cfg.mqar_queries)
            self.vocab_size = cfg.mqar_vocab
        else:
            self.train = TokenFile(cfg.train)
            self.valid = TokenFile(cfg.valid) if cfg.valid else None
            self.vocab_size = self.train.vocab_size

    def _get(self, source, seed: int, size: int):
        if self.cfg.kind == "mqar":
            return self.mqar.batch(seed, size)
        return source.batch(seed, size, self.cfg.seq_len)

    def train_batch(self, step: int, size: int):
        return self._get(getattr(self, "train", None), hash_seed(self.seed, 0, step), size)

    def eval_batch(self, index: int, size: int):
        source = getattr(self, "valid", None) or getattr(self, "train", None)
        return self._get(source, hash_seed(self.seed, 1, index, 0), size)


def hash_seed(*parts: int) -> int:
    """A seed for numpy from integers (stable across runs and platforms)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])
