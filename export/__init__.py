"""ONNX export of fixed-threshold HAM models. Not implemented yet: see the export issue."""
