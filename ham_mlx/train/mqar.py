"""Multi-query associative recall (MQAR, Arora et al., "Zoology", 2023), generated on the fly.

The layout is Zoology's: a sequence opens with `pairs` key-value pairs (keys from the lower half of
the vocabulary, values from the upper half), then a query region of padding in which `queries` of
those keys (distinct, in random order) sit at random even offsets. The target after each query key
is its value; values never appear in the query region's inputs, so a model cannot rule out values
it has already answered. Only the answer positions count in the loss and the accuracy. Token 0 pads.

With `min_pairs`, each sequence draws its own number of pairs from [min_pairs, pairs] (all of them
asked, or `queries` at most), as Zoology trains on a mixture of sizes: the small ones let attention
form its induction heads early, and what it learns carries over to the large ones.
"""

from __future__ import annotations

import numpy as np

PAD = 0
FIRST_TOKEN = 2  # ids 0 (padding) and 1 (reserved) are never keys or values


class MQAR:
    def __init__(
        self,
        vocab: int,
        pairs: int,
        seq_len: int,
        queries: int | None = None,
        min_pairs: int | None = None,
    ):
        queries = pairs if queries is None else queries
        min_pairs = pairs if min_pairs is None else min_pairs
        self.vocab, self.pairs, self.queries, self.seq_len = vocab, pairs, queries, seq_len
        self.min_pairs = min_pairs
        if not 1 <= min_pairs <= pairs:
            raise ValueError(f"mqar: min_pairs ({min_pairs}) must be in [1, pairs={pairs}]")
        half = (vocab - FIRST_TOKEN) // 2
        if half < pairs:
            raise ValueError(f"mqar: vocab {vocab} too small for {pairs} distinct keys")
        if not 1 <= queries <= pairs:
            raise ValueError(f"mqar: queries ({queries}) must be in [1, pairs={pairs}]")
        if (seq_len + 1 - 2 * pairs) // 2 < queries:  # even offsets of the query region
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
        for b in range(size):
            n = (
                int(rng.integers(self.min_pairs, self.pairs + 1))
                if self.min_pairs < self.pairs
                else self.pairs
            )
            q = min(self.queries, n)
            slots = (self.seq_len + 1 - 2 * n) // 2
            k = rng.choice(self.keys, n, replace=False)
            v = rng.choice(self.values, n, replace=True)
            tokens[b, 0 : 2 * n : 2], tokens[b, 1 : 2 * n : 2] = k, v
            where = 2 * n + 2 * np.sort(rng.choice(slots, q, replace=False))
            asked = rng.permutation(n)[:q]
            tokens[b, where] = k[asked]
            targets[b, where + 1] = v[asked]
            mask[b, where + 1] = True  # the answers
        return tokens[:, :-1], targets[:, 1:], mask[:, 1:]
