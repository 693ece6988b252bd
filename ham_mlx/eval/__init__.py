"""`ham-mlx eval`: perplexity through the caches, needle-in-a-haystack retrieval, and MQAR recall,
on any model folder (MLX) or exported folder (onnxruntime)."""

from ham_mlx.eval.mqar import mqar_accuracy
from ham_mlx.eval.niah import needle_retrieval
from ham_mlx.eval.ppl import perplexity
from ham_mlx.eval.runner import MLXRunner, OnnxRunner, Runner

__all__ = ["MLXRunner", "OnnxRunner", "Runner", "mqar_accuracy", "needle_retrieval", "perplexity"]
