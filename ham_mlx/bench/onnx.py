"""Hook for issue 7, item 3: onnxruntime against MLX decode and prefill on the same model.

Waits for the ONNX export (`ham_mlx.export`, not implemented yet). Nothing here measures anything:
`run_onnx` says so, and the report lists the onnxruntime target as pending.
"""

from __future__ import annotations

from typing import Any

NOT_AVAILABLE = "not measured: the ONNX export (ham_mlx.export) has not landed yet"


def run_onnx(*_: Any, **__: Any) -> dict[str, Any]:
    """Placeholder until the export exists: returns the reason, measures nothing."""
    return {"status": NOT_AVAILABLE}
