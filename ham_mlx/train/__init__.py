"""Training HAM models in MLX: `train(config)` / `ham-mlx train --config FILE`."""

from ham_mlx.train.config import DataConfig, TrainConfig
from ham_mlx.train.trainer import Trainer, train

__all__ = ["DataConfig", "TrainConfig", "Trainer", "train"]
