"""onnxruntime against MLX, decode and prefill on the same model.

One all-HAM model of the decode preset. Its per-layer τ is set first (an MLX prefill of the
longest context with `kv_budget` = the fraction asked for), then the model is exported with those
τ baked in (fp32, no debug outputs), so both runtimes admit the same tokens. For each context,
each runtime gets a fresh cache, prefills the same random tokens in the same chunks (timed), and
decodes greedily in rounds that alternate the two runtimes. The first decode logits of the two are
compared (max |Δ|) and the admitted counts must agree, so the timings are of the same computation.
onnxruntime runs with its default threads (all cores) and without spin-waiting; both runtimes are
warmed on a throwaway cache first. The exported graph takes `attention_mask` (all ones here).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ham_mlx.bench.contenders import decode_args
from ham_mlx.bench.timing import interleaved_step_samples
from ham_mlx.cache import HAMCache, kv_stats
from ham_mlx.model import Model

EXPORT_MISSING = "not measured: onnxruntime or onnx is not installed"
NO_SPINNING = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}


class MLXRunner:
    name = "mlx"

    def __init__(self, model: Model, taus: list[float]):
        self.model, self.cache = model, model.make_cache(threshold=taus)
        self.last: mx.array | None = None

    def prefill(self, tokens: np.ndarray, chunk: int) -> np.ndarray:
        for i in range(0, tokens.shape[1], chunk):
            logits = self.model(mx.array(tokens[:, i : i + chunk]), self.cache)
            mx.eval(logits, [c.state for c in self.cache])
        self.last = mx.argmax(logits[:, -1], axis=-1)
        mx.eval(self.last)
        return np.array(logits[:, -1])

    def step(self) -> np.ndarray:
        logits = self.model(self.last[None], self.cache)
        self.last = mx.argmax(logits[:, -1], axis=-1)
        mx.eval(self.last)
        return logits

    def admitted(self) -> list[int]:
        return [sum(s["admitted"]) for s in kv_stats(self.cache) if s["type"] == "ham"]


class OrtRunner:
    name = "onnxruntime"

    def __init__(self, model: Any, capacity: int):
        self.model, self.cache = model, model.make_cache(capacity=capacity)
        self.last: np.ndarray | None = None

    def prefill(self, tokens: np.ndarray, chunk: int) -> np.ndarray:
        for i in range(0, tokens.shape[1], chunk):
            logits = self.model(tokens[:, i : i + chunk], self.cache)
        self.last = logits[:, -1].argmax(axis=-1)
        return logits[:, -1]

    def step(self) -> np.ndarray:
        logits = self.model(self.last[:, None], self.cache)
        self.last = logits[:, -1].argmax(axis=-1)
        return logits

    def admitted(self) -> list[int]:
        return [sum(s["admitted"]) for s in self.cache.stats() if s["type"] == "ham"]


def calibrate(model: Model, tokens: np.ndarray, fraction: float, chunk: int = 256) -> list[float]:
    """Per-layer τ that caches about `fraction` of these tokens (the budget controller's)."""
    cache = model.make_cache(kv_budget=fraction)
    for i in range(0, tokens.shape[1], chunk):
        mx.eval(model(mx.array(tokens[:, i : i + chunk]), cache))
    taus = []
    for c in cache:
        if isinstance(c, HAMCache):
            c.settle()
            taus.append(float(c.admission.steady_thresholds()[0]))
    return taus


def run_onnx(
    preset: str,
    vocab_size: int,
    contexts: list[int],
    fraction: float,
    steps: int,
    repeats: int,
    warmup: int,
    chunk: int,
    log: Callable[[str], None] = print,
    seed: int = 0,
) -> dict[str, Any]:
    try:
        from ham_mlx.export.exporter import export_onnx
        from ham_mlx.export.runtime import OnnxModel
    except ImportError:
        return {"status": EXPORT_MISSING}
    mx.random.seed(seed)
    model = Model(decode_args(preset, vocab_size, "ham"))
    mx.eval(model.parameters())
    rng = np.random.default_rng(seed)
    stream = rng.integers(0, vocab_size, size=(1, max(contexts))).astype(np.int64)
    taus = calibrate(model, stream, fraction)
    log(f"onnx: τ per layer {[round(t, 4) for t in taus]} (for {fraction:.0%} cached)")
    capacity = max(contexts) + warmup + steps * repeats + 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="ham-bench-onnx-") as tmp:
        t = time.perf_counter()
        export_onnx(model, Path(tmp) / "model", threshold=taus, debug_outputs=False, report=False)
        export_seconds = time.perf_counter() - t
        log(f"onnx: exported in {export_seconds:.1f} s")
        # No spinning: onnxruntime's idle worker threads would otherwise busy-wait after each
        # call and take the cores from the MLX steps timed in between.
        ort_model = OnnxModel(Path(tmp) / "model", session_config=NO_SPINNING)
        # Warm both runtimes on a throwaway cache: a session's first call allocates its arena
        # and prepacks the weights, which would otherwise land in the first context's prefill.
        for r in (MLXRunner(model, taus), OrtRunner(ort_model, capacity)):
            r.prefill(stream[:, : min(64, stream.shape[1])], chunk)
            r.step()
        for ctx in sorted(contexts):
            runners = [MLXRunner(model, taus), OrtRunner(ort_model, capacity)]
            prefill_tps, first = {}, {}
            for r in runners:
                t = time.perf_counter()
                r.prefill(stream[:, :ctx], chunk)
                prefill_tps[r.name] = ctx / (time.perf_counter() - t)
                first[r.name] = np.array(r.step())[0, -1]
            delta = float(np.abs(first["mlx"] - first["onnxruntime"]).max())
            admitted = {r.name: r.admitted() for r in runners}
            samples = interleaved_step_samples(runners, warmup, repeats, steps)
            for r in runners:
                sec = statistics.median(samples[r.name])
                rows.append({
                    "context": ctx, "runtime": r.name, "tok_s": 1 / sec, "ms_per_step": 1e3 * sec,
                    "prefill_tok_s": prefill_tps[r.name],
                    "admitted_after_prefill": admitted[r.name],
                    "samples_ms": [1e3 * s for s in samples[r.name]],
                })  # fmt: skip
            same = admitted["mlx"] == admitted["onnxruntime"]
            log(
                f"  onnx at {ctx:>6}: decode MLX {rows[-2]['tok_s']:.1f} / onnxruntime "
                f"{rows[-1]['tok_s']:.1f} tok/s; prefill {prefill_tps['mlx']:.0f} / "
                f"{prefill_tps['onnxruntime']:.0f} tok/s; max |Δlogit| {delta:.1e}; "
                f"admitted {'equal' if same else 'DIFFER'}"
            )
            rows[-1]["max_abs_logit_diff"] = rows[-2]["max_abs_logit_diff"] = delta
            rows[-1]["admitted_equal"] = rows[-2]["admitted_equal"] = same
    return {
        "status": "measured", "preset": preset, "fraction": fraction, "thresholds": taus,
        "chunk": chunk, "export_seconds": export_seconds, "rows": rows,
    }  # fmt: skip
