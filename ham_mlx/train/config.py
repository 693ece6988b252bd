"""Training configuration, read from YAML or JSON (`ham-mlx train --config FILE`)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class DataConfig:
    kind: str = "tokens"  # "tokens" (a memory-mapped token file) or "mqar"
    train: str | None = None  # tokens: path of the training token file
    valid: str | None = None  # tokens: held-out token file
    seq_len: int = 256
    # MQAR (kind="mqar"): see ham_mlx.train.mqar
    mqar_vocab: int = 256
    mqar_pairs: int = 16
    mqar_queries: int | None = None  # default: all pairs


@dataclass
class TrainConfig:
    out_dir: str = "runs/ham"
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny"})
    tokenizer: str | None = None  # sentencepiece model copied into checkpoints
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 1000
    batch_size: int = 16  # global batch (split across data-parallel ranks)
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    kv_target: float | list[float] | None = None  # per HAM layer; default model.ham_kv_target
    threshold_rate: float = 0.1  # EMA rate of the threshold controller
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 0
    compile: bool = True
    lanes: int | None = None  # micro-batch parts computed in parallel on the CPU; None: automatic
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"train config: unknown keys {unknown}")
        d = dict(d)
        if "data" in d:
            if not isinstance(d["data"], dict):
                raise ValueError(f"train config: data={d['data']!r}: must be a mapping of settings")
            data_names = {f.name for f in dataclasses.fields(DataConfig)}
            bad = sorted(set(d["data"]) - data_names)
            if bad:
                raise ValueError(f"train config: unknown data keys {bad}")
            d["data"] = DataConfig(**d["data"])
        if isinstance(d.get("betas"), list) and len(d["betas"]) == 2:
            d["betas"] = tuple(d["betas"])
        cfg = cls(**d)
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"train config not found: {path}")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(text)
        else:
            d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a mapping of settings")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """ValueError naming the first key whose value has the wrong type or range."""
        for key, kind, ok, expected in CHECKS:
            obj = self.data if key.startswith("data.") else self
            value = getattr(obj, key.removeprefix("data."))
            if not (_is(value, kind) and ok(value)):
                hint = ""
                if kind == "number" and isinstance(value, str) and "e" in value.lower():
                    hint = " (YAML reads 3e-3 as text: write 3.0e-3)"
                raise ValueError(f"train config: {key}={value!r}: must be {expected}{hint}")
        if self.batch_size % self.grad_accum:
            raise ValueError("train config: batch_size must be a multiple of grad_accum")
        if self.warmup >= self.steps:
            raise ValueError(f"train config: warmup={self.warmup} must be < steps={self.steps} "
                             "(the warmup steps are part of the run)")  # fmt: skip
        if self.min_lr > self.lr:
            raise ValueError(f"train config: min_lr={self.min_lr} must be <= lr={self.lr}")
        if self.data.kind == "tokens" and not self.data.train:
            raise ValueError("train config: data.train (a token file) is required")


def _is(value: Any, kind: str) -> bool:
    """Whether value is of a config kind: int, number (finite), bool, str, str?, int?, dict."""
    if kind == "any" or (kind.endswith("?") and value is None):
        return True
    kind = kind.rstrip("?")
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == "int":
        return isinstance(value, int)
    if kind == "number":
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, {"str": str, "dict": dict}[kind])


def _numbers(value: Any, n: int | None, ok: Callable[[float], bool]) -> bool:
    values = value if isinstance(value, (list, tuple)) else [value]
    return (
        (n is None or (isinstance(value, (list, tuple)) and len(values) == n))
        and len(values) > 0
        and all(_is(v, "number") and ok(v) for v in values)
    )


def _any(value: Any) -> bool:
    return True


POSITIVE = "an integer >= 1"
# (key, kind, range check, what the value must be)
CHECKS: list[tuple[str, str, Callable[[Any], bool], str]] = [
    ("out_dir", "str", bool, "a folder path"),
    ("model", "dict", _any, 'a mapping ({"preset": NAME, ...} or {"path": FOLDER})'),
    ("tokenizer", "str?", _any, "a sentencepiece .model path or null"),
    ("steps", "int", lambda v: v >= 1, POSITIVE),
    ("batch_size", "int", lambda v: v >= 1, POSITIVE),
    ("grad_accum", "int", lambda v: v >= 1, POSITIVE),
    ("lr", "number", lambda v: v > 0, "a finite number > 0"),
    ("min_lr", "number", lambda v: v >= 0, "a finite number >= 0"),
    ("warmup", "int", lambda v: v >= 0, "an integer >= 0"),
    ("weight_decay", "number", lambda v: v >= 0, "a finite number >= 0"),
    ("betas", "any", lambda v: _numbers(v, 2, lambda b: 0 <= b < 1), "two numbers in [0, 1)"),
    ("grad_clip", "number", lambda v: v > 0, "a finite number > 0"),
    (
        "kv_target",
        "any",
        lambda v: v is None or _numbers(v, None, lambda f: 0 < f <= 1),
        "a fraction in (0, 1], a list of them, or null",
    ),
    ("threshold_rate", "number", lambda v: 0 < v <= 1, "a number in (0, 1]"),
    ("eval_every", "int", lambda v: v >= 1, POSITIVE),
    ("eval_batches", "int", lambda v: v >= 1, POSITIVE),
    ("checkpoint_every", "int", lambda v: v >= 1, POSITIVE + " (steps between checkpoints)"),
    ("keep_checkpoints", "int", lambda v: v >= 1, POSITIVE),
    ("seed", "int", lambda v: v >= 0, "an integer >= 0"),
    ("compile", "bool", _any, "true or false"),
    ("lanes", "int?", lambda v: v is None or v >= 1, POSITIVE + " or null (automatic)"),
    ("progress", "bool", _any, "true or false"),
    ("data.kind", "str", lambda v: v in ("tokens", "mqar"), "'tokens' or 'mqar'"),
    ("data.train", "str?", _any, "a token file path"),
    ("data.valid", "str?", _any, "a token file path or null"),
    ("data.seq_len", "int", lambda v: v >= 1, POSITIVE),
    ("data.mqar_vocab", "int", lambda v: v >= 1, POSITIVE),
    ("data.mqar_pairs", "int", lambda v: v >= 1, POSITIVE),
    ("data.mqar_queries", "int?", lambda v: v is None or v >= 1, POSITIVE + " or null"),
]
