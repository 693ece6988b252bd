"""ONNX export of HAM models (`export_onnx`) and an onnxruntime runner (`ham_mlx.export.runtime`).

Layout: `graph` (a small ONNX builder), `lower` (one lowering per ham_mlx module class), `cache_io`
(the cache tensors), `build` (the whole graph), `quantize` (8-/4-bit MatMulNBits weights),
`exporter` (files, variants, checks, parity warnings), `parity` (comparison with MLX, also of
padded batches row by row), `runtime` (onnxruntime generation, padded batches), `genai`
(onnxruntime-genai config). Measurements and notes: docs/export.md.
"""

from .exporter import ExportResult, ParityWarning, export_onnx
from .lower import UnsupportedFeature

__all__ = ["ExportResult", "ParityWarning", "UnsupportedFeature", "export_onnx"]
