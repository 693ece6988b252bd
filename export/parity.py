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


def pad_batch(
    prompts: Sequence[Sequence[int]], padding: str = "right", pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, T], attention_mask [B, T]): the prompts padded on one side to the longest."""
    if padding not in ("left", "right"):
        raise ValueError(f"padding={padding!r}: expected 'left' or 'right'")
    T = max(len(p) for p in prompts)
    ids = np.full((len(prompts), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), T), dtype=np.int64)
    for b, p in enumerate(prompts):
        span = slice(0, len(p)) if padding == "right" else slice(T - len(p), T)
        ids[b, span], mask[b, span] = p, 1
    return ids, mask


def compare_rows(
    mlx_model: Model,
    onnx_model: OnnxModel,
    prompts: Sequence[Sequence[int]],
    padding: str = "right",
    step: int | None = None,
    n_generate: int = 64,
    max_kv_tokens: int | None = None,
    pad_id: int = 0,
    capacity: int | None = None,
) -> dict[str, Any]:
    """Prompts of different lengths as one padded batch on onnxruntime (prefilled in calls of
    `step` tokens, then `n_generate` teacher-forced tokens per row), each row against MLX on that
    prompt alone: logits at the row's real positions, admission decisions, top-1 agreement, and
    the final caches (`mlx_caches[b]`, one per row, beside the batch's `onnx_cache`). capacity:
    the attention layers' buffers (default: the whole padded prompt and generation)."""
    B = len(prompts)
    ids, mask = pad_batch(prompts, padding, pad_id)
    T = ids.shape[1]
    step = step or T
    ham = [io.index for io in onnx_model.ios if io.kind == "ham"]
    taus = dict(zip(ham, onnx_model.thresholds))
    refs, tokens, mlx_caches, mlx_sets = [], [], [], []
    for p in prompts:  # MLX, each prompt alone, then its own greedy tokens
        cache = mlx_model.make_cache(
            threshold=onnx_model.thresholds or None, max_kv_tokens=max_kv_tokens,
            kv_policy="reject",
        )  # fmt: skip
        rows = [np.array(mlx_model(mx.array([list(p)]), cache).astype(mx.float32))[0]]
        out = []
        for _ in range(n_generate):
            out.append(int(rows[-1][-1].argmax()))
            rows.append(np.array(mlx_model(mx.array([[out[-1]]]), cache).astype(mx.float32))[0])
        refs.append(np.concatenate(rows))
        tokens.append(out)
        mlx_caches.append(cache)
        mlx_sets.append({i: _mlx_admitted(cache[i], 1)[0] for i in ham})

    total = T + n_generate
    ort_cache = onnx_model.make_cache(B, capacity or total, max_kv_tokens or total)
    got: list[list[np.ndarray]] = [[] for _ in range(B)]
    onnx_sets = [{i: set() for i in ham} for _ in range(B)]
    scores = [{i: {} for i in ham} for _ in range(B)]

    def call(x: np.ndarray, m: np.ndarray) -> None:
        before = ort_cache.offsets.copy()
        logits = onnx_model(x, ort_cache, attention_mask=m).astype(np.float32)
        for b in range(B):
            real = np.flatnonzero(m[b])
            got[b].append(logits[b, real])
            pos = before[b] + np.arange(len(real))
            for i in ham:
                st = ort_cache.layers[i]
                onnx_sets[b][i] |= set(pos[st.admitted[b, real]].tolist())
                scores[b][i].update(zip(pos.tolist(), st.surprise[b, real].tolist()))

    for a in range(0, T, step):
        call(ids[:, a : a + step], mask[:, a : a + step])
    for t in range(n_generate):
        nxt = np.array([[tokens[b][t]] for b in range(B)], dtype=np.int64)
        call(nxt, np.ones((B, 1), np.int64))

    max_err, max_abs, agree, steps, flips, outside = 0.0, 0.0, 0, 0, 0, 0
    per_row = []
    for b in range(B):
        g, r = np.concatenate(got[b]), refs[b]
        err = float(np.abs(g - r).max())
        max_err, max_abs = max(max_err, err), max(max_abs, float(np.abs(r).max()))
        top1 = int((g.argmax(-1) == r.argmax(-1)).sum())
        agree, steps = agree + top1, steps + len(r)
        row_flips = 0
        for i in ham:
            for t in mlx_sets[b][i] ^ onnx_sets[b][i]:
                row_flips += 1
                outside += abs(scores[b][i][t] - taus[i]) >= MARGIN
        flips += row_flips
        per_row.append({"tokens": len(r), "max_logit_error": err, "top1_agreement": top1 / len(r),
                        "admission_flips": row_flips})  # fmt: skip
    return {
        "tokens": steps,
        "rows": B,
        "max_logit_error": max_err,
        "relative_logit_error": max_err / max(max_abs, 1e-30),
        "admission_flips": flips,
        "flips_outside_margin": int(outside),
        "decisions": steps * len(ham),
        "top1_agreement": agree / max(steps, 1),
        "per_row": per_row,
        "greedy_tokens": tokens,
        "mlx_caches": mlx_caches,
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
