"""Training configuration, read from YAML or JSON (`ham-mlx train --config FILE`)."""

from __future__ import annotations

import dataclasses
import json
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
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"train config: unknown keys {unknown}")
        d = dict(d)
        if "data" in d:
            data_names = {f.name for f in dataclasses.fields(DataConfig)}
            bad = sorted(set(d["data"]) - data_names)
            if bad:
                raise ValueError(f"train config: unknown data keys {bad}")
            d["data"] = DataConfig(**d["data"])
        if "betas" in d:
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
        for key in ("steps", "batch_size", "grad_accum", "eval_batches"):
            if getattr(self, key) < 1:
                raise ValueError(f"train config: {key}={getattr(self, key)} must be >= 1")
        if self.batch_size % self.grad_accum:
            raise ValueError("train config: batch_size must be a multiple of grad_accum")
        if self.data.kind not in ("tokens", "mqar"):
            raise ValueError(f"train config: data.kind={self.data.kind!r}: 'tokens' or 'mqar'")
        if self.data.kind == "tokens" and not self.data.train:
            raise ValueError("train config: data.train (a token file) is required")
        if not 0 < self.threshold_rate <= 1:
            raise ValueError(f"train config: threshold_rate={self.threshold_rate} not in (0, 1]")
