"""The training loop: AdamW with warmup + cosine, clipping, a compiled step, gradient accumulation,
data parallelism over `mx.distributed`, threshold control, evaluation, exact checkpoints."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ham_mlx.config import ModelArgs
from ham_mlx.model import Model
from ham_mlx.model_io import load_model, save_model
from ham_mlx.ops import fast_math
from ham_mlx.ops.gated_delta import saving_for_gradient
from ham_mlx.presets import PRESETS, preset_args
from ham_mlx.tokenizer import Tokenizer
from ham_mlx.train import checkpoints
from ham_mlx.train.config import TrainConfig
from ham_mlx.train.data import Batches
from ham_mlx.train.lanes import Lanes, default_lanes, split_step
from ham_mlx.train.progress import StepClock, duration
from ham_mlx.train.thresholds import controller_rate, kept_fraction, update_thresholds


def build_model(spec: dict[str, Any], vocab_size: int) -> Model:
    """{"preset": NAME, **overrides} | {"path": MODEL_DIR} | ModelArgs fields."""
    spec = dict(spec)
    if "path" in spec:
        return load_model(spec.pop("path"))
    spec.setdefault("vocab_size", vocab_size)
    if "preset" in spec:
        name = spec.pop("preset")
        if name not in PRESETS:
            raise ValueError(f"train config: unknown model preset {name!r}")
        return Model(preset_args(name, **spec))
    return Model(ModelArgs(**spec))


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """-log softmax(logits)[target] per position, float32 `[B, L]`, with the log-sum-exp's exp
    from `fast_math` (twin: `nn.losses.cross_entropy`)."""
    logits = logits.astype(mx.float32)  # [B, L, V]
    m = mx.stop_gradient(mx.max(logits, axis=-1, keepdims=True))
    lse = mx.log(mx.sum(fast_math.exp(logits - m), axis=-1)) + m[..., 0]
    return lse - mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def loss_fn(model: Model, x: mx.array, y: mx.array, mask: mx.array):
    """Mean cross entropy over the masked positions; also each HAM layer's scores."""
    scores: list[mx.array] = []
    logits = model(x, scores=scores)
    ce = cross_entropy(logits, y)  # [B, L]
    loss = (ce * mask).sum() / mask.sum()
    return loss, scores


class Trainer:
    def __init__(self, cfg: TrainConfig, group: mx.distributed.Group | None = None):
        self.cfg = cfg
        self.group = group if group is not None else mx.distributed.init()
        self.rank, self.world = self.group.rank(), self.group.size()
        per_rank = cfg.batch_size // self.world
        if cfg.batch_size % self.world or per_rank % cfg.grad_accum:
            raise ValueError(
                f"batch_size {cfg.batch_size} must split evenly over {self.world} ranks "
                f"x {cfg.grad_accum} accumulation steps"
            )
        self.micro_size = per_rank // cfg.grad_accum
        self.batches = Batches(cfg.data, cfg.seed)
        mx.random.seed(cfg.seed)
        self.model = build_model(cfg.model, self.batches.vocab_size)
        self.model.check_token_ids = False  # checked once per batch on the host instead
        mx.eval(self.model.parameters())
        self.ham = self.model.ham_layers
        targets = cfg.kv_target if cfg.kv_target is not None else self.model.args.ham_kv_target
        n = len(self.ham)
        self.targets = None
        if targets is not None and n:
            self.targets = list(targets) if isinstance(targets, (list, tuple)) else [targets] * n
            if len(self.targets) != n:
                raise ValueError(f"kv_target: {len(self.targets)} values for {n} HAM layers")
            self.model.args.ham_kv_target = self.targets
        self.tokenizer = Tokenizer.from_file(cfg.tokenizer) if cfg.tokenizer else None
        warmup = min(cfg.warmup, cfg.steps - 1)
        schedule = optim.join_schedules(
            [
                optim.linear_schedule(cfg.lr / max(warmup, 1), cfg.lr, max(warmup, 1)),
                optim.cosine_decay(cfg.lr, max(cfg.steps - warmup, 1), cfg.min_lr),
            ],
            [max(warmup, 1)],
        )
        self.optimizer = optim.AdamW(
            learning_rate=schedule, betas=list(cfg.betas), weight_decay=cfg.weight_decay
        )
        self.optimizer.init(self.model.trainable_parameters())
        self.step = 0
        self.out = Path(cfg.out_dir)
        # lanes share one compiled step; uncompiled, arrays the model caches between calls
        # (stacked weights) would be made on one lane's stream and read on another's
        lanes = cfg.lanes if cfg.lanes is not None else default_lanes()
        self.lanes = Lanes(lanes if cfg.compile else 1)
        self._build_steps()

    # ---- compiled pieces ---------------------------------------------------------------------
    def _build_steps(self) -> None:
        model, opt, cfg = self.model, self.optimizer, self.cfg
        value_and_grad = nn.value_and_grad(model, loss_fn)

        def micro(x, y, mask):
            with saving_for_gradient():
                (loss, scores), grads = value_and_grad(model, x, y, mask)
            return loss, grads, scores

        def apply(grads, scores, rate):
            if self.world > 1:
                grads = tree_map(lambda g: mx.distributed.all_sum(g) / self.world, grads)
                scores = [mx.distributed.all_gather(s) for s in scores]
            grads, norm = optim.clip_grad_norm(grads, cfg.grad_clip)
            opt.update(model, grads)
            fractions = [kept_fraction(s, m.threshold) for s, m in zip(scores, self.ham)]
            if self.targets is not None:
                update_thresholds(self.ham, scores, self.targets, rate)
            return norm, fractions

        state = [model.state, opt.state]
        if cfg.compile:
            micro = mx.compile(micro, inputs=state, outputs=state)
            apply = mx.compile(apply, inputs=state, outputs=state)
        self._micro, self._apply = micro, apply

    def _arrays(self, batch) -> tuple[mx.array, mx.array, mx.array]:
        x, y, mask = batch
        if x.min() < 0 or max(x.max(), y.max()) >= self.model.args.vocab_size:
            raise ValueError(f"data has token ids outside [0, {self.model.args.vocab_size})")
        mask = np.ones(y.shape, dtype=bool) if mask is None else mask
        return mx.array(x), mx.array(y), mx.array(mask.astype(np.float32))

    def _local(self, batch, micro: int):
        """This rank's rows of micro-batch `micro` of a global batch."""
        lo = (micro * self.world + self.rank) * self.micro_size
        return tuple(None if a is None else a[lo : lo + self.micro_size] for a in batch)

    # ---- one optimizer step ------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        cfg = self.cfg
        total = None
        losses, all_scores = [], []
        batch = self.batches.train_batch(self.step, cfg.batch_size)  # the global batch
        for m in range(cfg.grad_accum):
            x, y, mask = self._arrays(self._local(batch, m))
            loss, grads, scores = split_step(self.lanes, self._micro, x, y, mask)
            total = grads if total is None else tree_map(mx.add, total, grads)
            losses.append(loss)
            all_scores.append(scores)
        if cfg.grad_accum > 1:
            total = tree_map(lambda g: g / cfg.grad_accum, total)
        scores = [mx.concatenate([s[i] for s in all_scores]) for i in range(len(self.ham))]
        rate = mx.array(controller_rate(self.step, cfg.threshold_rate, cfg.warmup), mx.float32)
        norm, fractions = self._apply(total, scores, rate)
        loss = sum(losses) / len(losses)
        if self.world > 1:
            loss = mx.distributed.all_sum(loss) / self.world
        mx.eval(loss, norm, fractions, self.model.state, self.optimizer.state)
        self.step += 1
        return {
            "step": self.step, "loss": float(loss), "grad_norm": float(norm),
            "lr": float(self.optimizer.learning_rate), "kv_fraction": [float(f) for f in fractions],
            "thresholds": self.model.thresholds(),
        }  # fmt: skip

    def evaluate(self) -> dict[str, Any]:
        """Held-out loss, answer accuracy (masked data) and KV fraction at the current τ."""
        losses, correct, counted = [], 0.0, 0.0
        kept = np.zeros(len(self.ham))
        for i in range(self.cfg.eval_batches):
            x, y, mask = self._arrays(self.batches.eval_batch(i, self.micro_size))
            scores: list[mx.array] = []
            logits = self.model(x, scores=scores)
            ce = cross_entropy(logits, y)
            losses.append(float((ce * mask).sum() / mask.sum()))
            hits = (mx.argmax(logits, axis=-1) == y).astype(mx.float32) * mask
            correct += float(hits.sum())
            counted += float(mask.sum())
            kept += [float(kept_fraction(s, m.threshold)) for s, m in zip(scores, self.ham)]
        kv = (kept / self.cfg.eval_batches).tolist()
        return {
            "step": self.step, "eval_loss": float(np.mean(losses)),
            "eval_accuracy": correct / counted, "eval_kv_fraction": kv,
        }  # fmt: skip

    # ---- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """out_dir/checkpoints/step-NNNNNNN (see checkpoints): model folder (weights and
        thresholds), optimizer state, trainer state. The data position is the step (batches are a
        function of seed and step) and a training step draws no random numbers, so this is all an
        exact resume needs."""
        if self.rank != 0:
            return None
        state = {"step": self.step, "config": self.cfg.to_dict()}
        return checkpoints.write(
            self.out / "checkpoints", self.step, self.model,
            dict(tree_flatten(self.optimizer.state)), state, self.tokenizer,
            self.cfg.keep_checkpoints,
        )  # fmt: skip

    def load_checkpoint(self, path: str | Path) -> None:
        self._restore(checkpoints.read(Path(path), self._optimizer_keys()))

    def _optimizer_keys(self) -> set[str]:
        return {k for k, _ in tree_flatten(self.optimizer.state)}

    def _restore(self, ckpt: checkpoints.Checkpoint) -> None:
        self.model.load_weights(list(tree_flatten(ckpt.model.parameters())))
        self.optimizer.state = tree_unflatten(list(ckpt.optimizer.items()))
        mx.eval(self.model.state, self.optimizer.state)
        self.step = ckpt.step
        self._build_steps()

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint that loads (broken ones are named on stderr and skipped)."""
        ckpt = checkpoints.newest(self.out / "checkpoints", self._optimizer_keys())
        return None if ckpt is None else ckpt.path

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self, resume: bool = False, stop_at: int | None = None) -> dict[str, Any]:
        """Train to cfg.steps (or stop_at); returns the last training and evaluation records."""
        cfg = self.cfg
        if self.rank == 0:
            checkpoints.remove_stale(self.out / "checkpoints")
        if resume:
            ckpt = checkpoints.newest(self.out / "checkpoints", self._optimizer_keys())
            if ckpt is not None:
                self._restore(ckpt)
        self.out.mkdir(parents=True, exist_ok=True)
        log = (self.out / "metrics.jsonl").open("a") if self.rank == 0 else None
        end = min(cfg.steps, stop_at or cfg.steps)
        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step")
        tokens_per_step = cfg.batch_size * cfg.data.seq_len
        record: dict[str, Any] = {}
        evaluation: dict[str, Any] = {}
        clock = StepClock()
        self._say(f"train: steps {self.step + 1}-{end} of {cfg.batch_size} x {cfg.data.seq_len} "
                  "tokens; the first step compiles, the time left follows from step 2")  # fmt: skip
        while self.step < end:
            t0 = time.perf_counter()
            record = self.train_step()
            if not math.isfinite(record["loss"]):
                raise ValueError(f"step {self.step}: the loss is {record['loss']}; training "
                                 "stopped (no checkpoint of this step is written)")  # fmt: skip
            elapsed = time.perf_counter() - t0
            clock.add(elapsed)
            record["tokens_per_s"] = tokens_per_step / max(elapsed, 1e-9)
            left = clock.left(end - self.step)
            if len(clock.recent) == 1 and end > self.step:
                self._say(f"train: {clock.per_step():.2f} s/step "
                          f"({tokens_per_step / clock.per_step():.0f} tokens/s; the first step "
                          f"took {clock.first:.1f} s): about {duration(left)} for the "
                          f"{end - self.step} steps left")  # fmt: skip
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                evaluation = self.evaluate()
                record.update(evaluation)
            if log:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if bar is not None:
                kv = "/".join(f"{f:.2f}" for f in record["kv_fraction"])
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", kv=kv,
                    left=duration(left),
                )  # fmt: skip
                bar.update(1)
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        result: dict[str, Any] = {"train": record, "eval": evaluation}
        if self.step == cfg.steps and self.rank == 0:
            final = save_model(self.model, self.out / "final", self.tokenizer)
            self._say(f"train: saved the model to {final}")
            result["model"] = str(final)
        if log:
            log.close()
        return result

    def _say(self, line: str) -> None:
        if self.rank == 0 and self.cfg.progress:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stderr)  # above a progress bar, if one is shown


def train(config: TrainConfig | dict | str | Path, resume: bool = False) -> dict[str, Any]:
    """Train from a TrainConfig, a dict, or a YAML/JSON file; returns the last records."""
    if isinstance(config, (str, Path)):
        config = TrainConfig.from_file(config)
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    return Trainer(config).fit(resume=resume)
