"""Multi-query associative recall (MQAR, Arora et al., "Zoology", 2023), generated on the fly.

A sequence holds `pairs` key-value pairs (keys from the lower half of the vocabulary, values from
the upper half), then `queries` of those keys in random order, each followed by its value. Only the
answer positions count in the loss and the accuracy. Token 0 pads; token 1 separates.
"""

from __future__ import annotations

import numpy as np

PAD, SEP = 0, 1


class MQAR:
    def __init__(self, vocab: int, pairs: int, seq_len: int, queries: int | None = None):
        queries = pairs if queries is None else queries
        self.vocab, self.pairs, self.queries, self.seq_len = vocab, pairs, queries, seq_len
        half = (vocab - 2) // 2
        if half < pairs:
            raise ValueError(f"mqar: vocab {vocab} too small for {pairs} distinct keys")
        if queries > pairs:
            raise ValueError(f"mqar: queries ({queries}) must be <= pairs ({pairs})")
        if 2 * pairs + 1 + 2 * queries > seq_len + 1:
            raise ValueError(f"mqar: seq_len {seq_len} too short for {pairs} pairs")
        self.keys = np.arange(2, 2 + half)
        self.values = np.arange(2 + half, 2 + 2 * half)

    def batch(self, seed: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(inputs [size, seq_len], targets [size, seq_len], loss mask [size, seq_len])."""
        rng = np.random.default_rng(seed)
        full = np.full((size, self.seq_len + 1), PAD, dtype=np.int32)
        mask = np.zeros((size, self.seq_len + 1), dtype=bool)
        n, q = self.pairs, self.queries
        for b in range(size):
            k = rng.choice(self.keys, n, replace=False)
            v = rng.choice(self.values, n, replace=True)
            full[b, 0 : 2 * n : 2], full[b, 1 : 2 * n : 2] = k, v
            full[b, 2 * n] = SEP
            order = rng.permutation(n)[:q]
            start = 2 * n + 1
            full[b, start : start + 2 * q : 2] = k[order]
            full[b, start + 1 : start + 2 * q : 2] = v[order]
            mask[b, start + 1 : start + 2 * q : 2] = True  # the answers
        return full[:, :-1], full[:, 1:], mask[:, 1:]
