"""Training-step throughput: the CPU fast paths against the reference path, in one process.

Each variant is a compiled training step (the trainer's loss, value and gradient, clipping and
AdamW) of the same preset with the same weights and batch, traced under its own switches:
- `reference`: MLX's exp/sigmoid/SiLU and scaled_dot_product_attention, MLX's autodiff of
  the chunked scan (HAM_MLX_NO_FAST_MATH=1, HAM_MLX_AUTODIFF_SCAN=1), and MLX's own CPU buffer
  cache limit (see `ham_mlx.buffer_cache`);
- `fast math`: `ops.fast_math` only; `written gradient`: the scan's written-out gradient only;
  `buffer cache`: the raised cache limit only;
- `fast one lane`: all three, the batch in one piece;
- `fast`: all three, and the batch split over `lanes.default_lanes()` lanes (two on a CPU with
  two or more cores: `ham_mlx.train.lanes`), the trainer's default.
The steps are timed in interleaved rounds (`timing.interleaved_step_samples`), medians reported.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from ham_mlx import buffer_cache
from ham_mlx.model import Model
from ham_mlx.ops.gated_delta import saving_for_gradient
from ham_mlx.presets import preset_args
from ham_mlx.train.lanes import Lanes, default_lanes, split_step
from ham_mlx.train.trainer import loss_fn

FAST = {"HAM_MLX_NO_FAST_MATH": "0", "HAM_MLX_AUTODIFF_SCAN": "0"}
VARIANTS: dict[str, dict[str, str]] = {
    "reference": {"HAM_MLX_NO_FAST_MATH": "1", "HAM_MLX_AUTODIFF_SCAN": "1"},
    "fast math": {"HAM_MLX_NO_FAST_MATH": "0", "HAM_MLX_AUTODIFF_SCAN": "1"},
    "written gradient": {"HAM_MLX_NO_FAST_MATH": "1", "HAM_MLX_AUTODIFF_SCAN": "0"},
    "buffer cache": {"HAM_MLX_NO_FAST_MATH": "1", "HAM_MLX_AUTODIFF_SCAN": "1"},
    "fast one lane": FAST,
    "fast": FAST,
}
RAISED = ("buffer cache", "fast one lane", "fast")


class TrainStep:
    """One variant's compiled step on a fixed batch; `step()` runs one and waits for it."""

    def __init__(self, name: str, preset: str, vocab: int, batch: int, seq_len: int,
                 seed: int = 0, **overrides: Any) -> None:  # fmt: skip
        self.name, self.env = name, VARIANTS[name]
        mx.random.seed(seed)
        self.model = Model(preset_args(preset, vocab, **overrides))
        self.model.check_token_ids = False
        self.optimizer = optim.AdamW(learning_rate=1e-3)
        tokens = mx.random.randint(0, vocab, (batch, seq_len + 1), key=mx.random.key(seed))
        self.x, self.y = tokens[:, :-1], tokens[:, 1:]
        self.mask = mx.ones(self.y.shape)
        self.lanes = Lanes(default_lanes() if name == "fast" else 1)
        value_and_grad = nn.value_and_grad(self.model, loss_fn)
        state = [self.model.state, self.optimizer.state]

        def step(x, y, mask):  # the batch in one piece: one compiled step
            with saving_for_gradient():  # (the written gradient's; no effect on autodiff)
                (loss, _), grads = value_and_grad(self.model, x, y, mask)
            grads, _ = optim.clip_grad_norm(grads, 1.0)
            self.optimizer.update(self.model, grads)
            return loss

        def micro(x, y, mask):  # lanes: the trainer's split (one part's gradient, then apply)
            with saving_for_gradient():
                (loss, scores), grads = value_and_grad(self.model, x, y, mask)
            return loss, grads, scores

        def apply(grads):
            grads, _ = optim.clip_grad_norm(grads, 1.0)
            self.optimizer.update(self.model, grads)

        self._step = mx.compile(step, inputs=state, outputs=state)
        self._micro = mx.compile(micro, inputs=state, outputs=state)
        self._apply = mx.compile(apply, inputs=state, outputs=state)
        mx.eval(self.model.parameters(), self.x)

    def step(self) -> None:
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)  # the switches are read while the step is traced
        own = buffer_cache.mlx_limit  # None off the CPU: nothing to vary
        if own is not None:
            limit = (buffer_cache.cpu_cache_bytes() or own) if self.name in RAISED else own
            if mx.set_cache_limit(limit) != limit:  # another variant's limit: start from empty
                mx.clear_cache()
        try:
            if self.lanes.n == 1:
                loss = self._step(self.x, self.y, self.mask)
            else:
                loss, grads, _ = split_step(self.lanes, self._micro, self.x, self.y, self.mask)
                self._apply(grads)
            mx.eval(loss, self.model.state, self.optimizer.state)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def summarize(samples: dict[str, list[float]], tokens: int) -> list[dict[str, Any]]:
    """Median seconds, tokens/s and the speed-up over `reference` for each variant."""
    base = statistics.median(samples["reference"]) if "reference" in samples else None
    rows = []
    for name, s in samples.items():
        med = statistics.median(s)
        rows.append({"variant": name, "median_s": med, "tokens_per_s": tokens / med,
                     "speedup": None if base is None else base / med, "samples": s})  # fmt: skip
    return rows
