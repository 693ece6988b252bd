"""Multi-query associative recall (ham_mlx.train.mqar's generator) through the model's caches:
accuracy at the answer positions, and the admitted fraction of each HAM layer."""

from __future__ import annotations

from typing import Any

import numpy as np

from ham_mlx.eval.runner import Runner, progress_bar
from ham_mlx.train.data import hash_seed
from ham_mlx.train.mqar import MQAR


def mqar_accuracy(
    runner: Runner,
    vocab: int = 256,
    pairs: int = 16,
    seq_len: int = 128,
    queries: int | None = None,
    batches: int = 4,
    batch_size: int = 16,
    seed: int = 0,
    chunk: int = 512,
    progress: bool = False,
) -> dict[str, Any]:
    """Recall accuracy over `batches` held-out batches (seeds distinct from training's)."""
    if vocab > runner.vocab_size:
        raise ValueError(f"mqar vocab {vocab} is larger than the model's ({runner.vocab_size})")
    task = MQAR(vocab, pairs, seq_len, queries)
    correct = counted = 0
    kept: list[list[float]] = []
    bar = progress_bar(batches, progress, "mqar", "batch")
    for i in range(batches):
        x, y, mask = task.batch(hash_seed(seed, 2, i), batch_size)
        cache = runner.make_cache(batch_size, seq_len)
        logits = np.concatenate(
            [runner.logits(x[:, j : j + chunk], cache) for j in range(0, seq_len, chunk)], axis=1
        )
        hits = (logits.argmax(-1) == y) & mask
        correct, counted = correct + int(hits.sum()), counted + int(mask.sum())
        kept.append(runner.kv_fraction(cache))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {
        "vocab": vocab, "pairs": pairs, "queries": task.queries, "seq_len": seq_len,
        "sequences": batches * batch_size, "accuracy": correct / counted,
        "kv_fraction": np.mean(kept, axis=0).tolist() if kept and kept[0] else [],
    }  # fmt: skip
