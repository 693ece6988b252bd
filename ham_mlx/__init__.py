"""ham_mlx: Hybrid Associative Memory language models on MLX."""

from ham_mlx._blas import preload_openblas

preload_openblas()  # before anything imports mlx.core

from ham_mlx.buffer_cache import raise_cpu_cache_limit  # noqa: E402
from ham_mlx.cache import kv_stats, load_prompt_cache, save_prompt_cache  # noqa: E402
from ham_mlx.config import ModelArgs  # noqa: E402
from ham_mlx.generate import GenerationResponse, generate, stream_generate  # noqa: E402
from ham_mlx.model import Model  # noqa: E402
from ham_mlx.model_io import default_model_path, load, load_model, save_model  # noqa: E402
from ham_mlx.tokenizer import Tokenizer  # noqa: E402

raise_cpu_cache_limit()

__version__ = "0.1.0"
__all__ = [
    "GenerationResponse", "Model", "ModelArgs", "Tokenizer", "default_model_path", "generate",
    "kv_stats", "load",
    "load_model", "load_prompt_cache", "save_model", "save_prompt_cache", "stream_generate",
]  # fmt: skip
