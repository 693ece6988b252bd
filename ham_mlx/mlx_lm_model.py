"""What mlx-lm's loader needs from a model folder's `model_file` module: `Model` and `ModelArgs`.

mlx-lm (>= 0.32) builds architectures it does not know from a Python file in the model folder:
`config.json`'s `model_file` names it, and `mlx_lm.load(folder, trust_remote_code=True)` (or a
console script with `--trust-remote-code`) imports it and calls `ModelArgs.from_dict(config)`,
`Model(args)`, `model.sanitize(weights)`, then loads the weights (quantized first when the config
says so). Every folder that ham_mlx writes carries that file, `ham_model.py`, which imports the
two classes from here, so the code stays in the installed package.

`Model` is ham_mlx's model with two hooks of mlx-lm's converter (`mlx_lm.convert`):
`cast_predicate` keeps A_log, dt_bias and threshold in float32 under `--dtype`, and
`quant_predicate` leaves the small projections (as `ham-mlx convert --quantize` does) in the model
dtype under `-q`. Folders that mlx-lm saves (its `save` copies `ham_model.py` and writes the config
it loaded) load again with mlx-lm and with `ham_mlx.load_model`.
"""

from __future__ import annotations

from typing import Any

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core on Linux)

# isort: split
import mlx.nn as nn

from ham_mlx.config import ModelArgs as _ModelArgs
from ham_mlx.convert.quantize import KEEP
from ham_mlx.model import FP32_PARAMS
from ham_mlx.model import Model as _Model

__all__ = ["Model", "ModelArgs"]


class ModelArgs(_ModelArgs):
    """`ModelArgs.from_dict` on the config dict of mlx-lm's loader."""

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> ModelArgs:
        # mlx-lm's quantizer reads a present `quantization` key as a per-layer map and fails on
        # the null that an unquantized folder has; without the key it quantizes normally.
        if "quantization" in params and params["quantization"] is None:
            del params["quantization"]
        return super().from_dict(params)


class Model(_Model):
    """ham_mlx's `Model`, plus the predicates of mlx-lm's converter."""

    def cast_predicate(self, key: str) -> bool:
        """mlx-lm casts a parameter to `--dtype` only where this is true."""
        return key.split(".")[-1] not in FP32_PARAMS

    def quant_predicate(self, path: str, module: nn.Module) -> bool:
        """mlx-lm quantizes a layer (`-q`) only where this is true."""
        parts = path.split(".")
        return parts[-1] not in KEEP and "router" not in parts
