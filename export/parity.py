"""Parity of an exported model with the MLX model it came from.

Both run the same token stream: a prompt fed in chunks, then tokens generated greedily by the MLX
model and fed to both (teacher forcing, so one early difference cannot derail the comparison).
Reported: the largest logit difference, the admission decisions that differ (and how many of them
lie outside the margin |score - τ| < 1e-4, where a float rounding may legitimately flip a
decision), top-1 agreement, and both final caches for the tests to compare.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from ham_mlx.model import Model

from .runtime import OnnxModel

MARGIN = 1e-4


def _mlx_admitted(cache, rows: int) -> list[set[int]]:
    """Positions admitted by an MLX HAMCache, per row."""
    counts = cache.admitted_counts()
    if not counts:
        return [set() for _ in range(rows)]
    pos = np.array(cache.positions)
    return [set(pos[b, : counts[b]].tolist()) for b in range(rows)]


def compare(
    mlx_model: Model,
    onnx_model: OnnxModel,
    prompt: np.ndarray,
    chunks: Sequence[int] | None = None,
    n_generate: int = 64,
    max_kv_tokens: int | None = None,
) -> dict[str, Any]:
    """Run `prompt` [B, T] (in `chunks`, default whole) then `n_generate` greedy MLX tokens
    through both models; return the differences and both caches."""
    prompt = np.asarray(prompt, dtype=np.int64)
    B, T = prompt.shape
    chunks = list(chunks or [T])
    if sum(chunks) != T:
        raise ValueError(f"chunks {chunks} do not add up to the prompt length {T}")
    total = T + n_generate
    mlx_cache = mlx_model.make_cache(
        threshold=onnx_model.thresholds or None,
        max_kv_tokens=max_kv_tokens,
        kv_policy="reject",
    )
    ort_cache = onnx_model.make_cache(B, total, max_kv_tokens or total)
    ham = [io.index for io in onnx_model.ios if io.kind == "ham"]
    admitted_onnx: dict[int, list[set[int]]] = {i: [set() for _ in range(B)] for i in ham}
    scores: dict[int, list[np.ndarray]] = {i: [] for i in ham}
    max_err, agree, steps = 0.0, 0, 0
    max_abs = 0.0

    def step(ids: np.ndarray) -> np.ndarray:
        nonlocal max_err, agree, steps, max_abs
        offset = ort_cache.offset
        ref = mlx_model(mx.array(ids), mlx_cache).astype(mx.float32)
        ref = np.array(ref)
        got = onnx_model(ids, ort_cache).astype(np.float32)
        max_err = max(max_err, float(np.abs(got - ref).max()))
        max_abs = max(max_abs, float(np.abs(ref).max()))
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        steps += got.shape[0] * got.shape[1]
        for i in ham:
            st = ort_cache.layers[i]
            scores[i].append(st.surprise)
            for b in range(B):
                admitted_onnx[i][b] |= {offset + t for t in np.flatnonzero(st.admitted[b])}
        return ref

    i = 0
    for n in chunks:
        ref = step(prompt[:, i : i + n])
        i += n
    for _ in range(n_generate):
        nxt = ref[:, -1].argmax(-1)[:, None].astype(np.int64)
        ref = step(nxt)

    flips, outside = 0, 0
    taus = dict(zip(ham, onnx_model.thresholds))
    for i in ham:
        mlx_sets = _mlx_admitted(mlx_cache[i], B)
        score = np.concatenate(scores[i], axis=1)  # [B, total]
        for b in range(B):
            for t in mlx_sets[b] ^ admitted_onnx[i][b]:
                flips += 1
                if abs(score[b, t] - taus[i]) >= MARGIN:
                    outside += 1
    return {
        "tokens": total,
        "rows": B,
        "max_logit_error": max_err,
        "relative_logit_error": max_err / max(max_abs, 1e-30),
        "admission_flips": flips,
        "flips_outside_margin": outside,
        "decisions": B * total * len(ham),
        "top1_agreement": agree / max(steps, 1),
        "mlx_cache": mlx_cache,
        "onnx_cache": ort_cache,
    }


def report_line(name: str, r: dict[str, Any], size_bytes: int | None = None) -> str:
    size = f"{size_bytes / 1e6:8.2f} MB | " if size_bytes is not None else ""
    return (
        f"{name:<6} | {size}max |Δlogit| {r['max_logit_error']:.2e} "
        f"(rel {r['relative_logit_error']:.1e}) | admission flips {r['admission_flips']}"
        f"/{r['decisions']} ({r['flips_outside_margin']} outside ±{MARGIN:g}) | "
        f"top-1 agreement {100 * r['top1_agreement']:.1f}%"
    )
