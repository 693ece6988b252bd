"""mlx-lm's `model_file` for this model folder (config.json names it).

`mlx_lm.load(folder, trust_remote_code=True)` and mlx-lm's console scripts with
`--trust-remote-code` import it to build the model; the code is the installed ham_mlx package
(pip install ham-mlx), this file only points there.
"""

from ham_mlx.mlx_lm_model import Model, ModelArgs  # noqa: F401
