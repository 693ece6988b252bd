"""ONNX export of HAM models (`export_onnx`) and an onnxruntime runner (`ham_mlx.export.runtime`).

Layout: `graph` (a small ONNX builder), `lower` (one lowering per ham_mlx module class), `cache_io`
(the cache tensors), `build` (the whole graph), `exporter` (files, variants, checks), `parity`
(comparison with MLX), `runtime` (onnxruntime generation), `genai` (onnxruntime-genai config).
"""

from .exporter import ExportResult, export_onnx
from .lower import UnsupportedFeature

__all__ = ["ExportResult", "UnsupportedFeature", "export_onnx"]
