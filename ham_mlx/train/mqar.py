"""Multi-query associative recall (MQAR, Arora et al., "Zoology", 2023), generated on the fly.

The layout is Zoology's: a sequence opens with `pairs` key-value pairs (keys from the lower half of
the vocabulary, values from the upper half), then a query region of padding in which `queries` of
those keys (distinct, in random order) sit at random even offsets. The target after each query key
is its value; values never appear in the query region's inputs, so a model cannot rule out values
it has already answered. Only the answer positions count in the loss and the accuracy. Token 0 pads.
"""

from __future__ import annotations

import numpy as np

PAD = 0
FIRST_TOKEN = 2  # ids 0 (padding) and 1 (reserved) are never keys or values


class MQAR:
    def __init__(self, vocab: int, pairs: int, seq_len: int, queries: int | None = None):
        queries = pairs if queries is None else queries
        self.vocab, self.pairs, self.queries, self.seq_len = vocab, pairs, queries, seq_len
        half = (vocab - FIRST_TOKEN) // 2
        if half < pairs:
            raise ValueError(f"mqar: vocab {vocab} too small for {pairs} distinct keys")
        if not 1 <= queries <= pairs:
            raise ValueError(f"mqar: queries ({queries}) must be in [1, pairs={pairs}]")
        self.slots = (seq_len + 1 - 2 * pairs) // 2  # even offsets of the query region
        if self.slots < queries:
            need = 2 * pairs + 2 * queries - 1
            raise ValueError(
                f"mqar: seq_len {seq_len} too short for {pairs} pairs and {queries} queries "
                f"(need at least {need})"
            )
        self.keys = np.arange(FIRST_TOKEN, FIRST_TOKEN + half)
        self.values = np.arange(FIRST_TOKEN + half, FIRST_TOKEN + 2 * half)

    def batch(self, seed: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(inputs [size, seq_len], targets [size, seq_len], loss mask [size, seq_len])."""
        rng = np.random.default_rng(seed)
        tokens = np.full((size, self.seq_len + 1), PAD, dtype=np.int32)
        targets = np.full((size, self.seq_len + 1), PAD, dtype=np.int32)
        mask = np.zeros((size, self.seq_len + 1), dtype=bool)
        n, q = self.pairs, self.queries
        for b in range(size):
            k = rng.choice(self.keys, n, replace=False)
            v = rng.choice(self.values, n, replace=True)
            tokens[b, 0 : 2 * n : 2], tokens[b, 1 : 2 * n : 2] = k, v
            where = 2 * n + 2 * np.sort(rng.choice(self.slots, q, replace=False))
            asked = rng.permutation(n)[:q]
            tokens[b, where] = k[asked]
            targets[b, where + 1] = v[asked]
            mask[b, where + 1] = True  # the answers
        return tokens[:, :-1], targets[:, 1:], mask[:, 1:]
