"""`ham-mlx bench`: speed and memory of HAM generation against same-size baselines.

One module per job: `machine` (machine and library facts), `probe` (memory bandwidth and matmul
throughput), `contenders` (the same-size models under test), `decode` (tokens/s and KV bytes
against context), `prefill` (scan and attention ops against length), `targets` (the speed
targets, checked on the measured numbers), `report` (JSON, markdown, PNG), `onnx` (onnxruntime
against MLX on the same exported model), `run` (options and the order of the parts).

Benchmarks are not tests: timings are never asserted, only reported, as medians and same-run ratios.
"""
