"""Named model sizes for `ham-mlx init`: random weights, for tests, demos and benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

from ham_mlx.config import ModelArgs
from ham_mlx.model import Model
from ham_mlx.tokenizer import Tokenizer, bundled_tokenizer_path

HYBRID_ATTN = {"num_heads": 4, "num_kv_heads": 2, "window_size": None, "rope_theta": 10000.0}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=32),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_heads=4, head_dim=64),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_heads=6, head_dim=128),
    "tiny-hybrid": dict(
        hidden_size=64, num_hidden_layers=4, num_heads=2, head_dim=32,
        layer_types=["ham", "gdn", "attn", "ham"], attn=HYBRID_ATTN,
    ),
    "tiny-gdn": dict(hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=32,
                     layer_types=["gdn", "gdn"]),
    "tiny-attn": dict(hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=32,
                      layer_types=["attn", "attn"], attn=HYBRID_ATTN),
}  # fmt: skip


def preset_args(name: str, vocab_size: int, **overrides: Any) -> ModelArgs:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelArgs(**{**PRESETS[name], "vocab_size": vocab_size, **overrides})


def init_model(path: str | Path, preset: str, seed: int = 0, **overrides: Any) -> Path:
    """Write a random-weights model folder with the bundled tokenizer."""
    from ham_mlx.model_io import save_model

    tokenizer = Tokenizer.from_file(bundled_tokenizer_path())
    args = preset_args(preset, tokenizer.vocab_size, **overrides)
    mx.random.seed(seed)
    model = Model(args)
    mx.eval(model.parameters())
    return save_model(model, path, tokenizer)
