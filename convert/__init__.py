"""Checkpoint conversion: PyTorch (FLA Gated DeltaNet and hybrids, HAM) -> ham_mlx model folders.

`convert(src, dst, dtype=None, quantize=False, q_bits=4, q_group_size=64)`; the command line is
`ham-mlx convert SRC DST`. Weight files are read without torch and without running pickled code
(`torch_zip`). `torch_reference` is a plain-PyTorch HAM model that defines the source layout.
"""

from ham_mlx.convert.pipeline import ConversionSummary, convert
from ham_mlx.convert.tensors import ConversionError

__all__ = ["ConversionError", "ConversionSummary", "convert"]
