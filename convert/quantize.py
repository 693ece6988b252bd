"""Weight quantization of a converted model (mlx.nn.quantize, affine, per group)."""

from __future__ import annotations

import mlx.nn as nn

from ham_mlx.model import Model

# Small projections that steer the recurrence or the router: they cost little and their outputs
# go through exp/softplus/sigmoid, so they stay in the model dtype.
KEEP = ("a_proj", "b_proj", "kv_gate_proj")


def quantizable(path: str, module: nn.Module, group_size: int) -> bool:
    """Linear and Embedding layers whose input size is a multiple of the group size, except the
    decay/beta/gate projections and the learned router."""
    if not hasattr(module, "to_quantized"):
        return False
    parts = path.split(".")
    if parts[-1] in KEEP or "router" in parts:
        return False
    return module.weight.shape[-1] % group_size == 0


def quantize_model(model: Model, bits: int, group_size: int) -> list[str]:
    """Quantize `model` in place; record it in model.args; return the quantized module paths."""
    done: list[str] = []

    def predicate(path: str, module: nn.Module) -> bool:
        ok = quantizable(path, module, group_size)
        if ok:
            done.append(path)
        return ok

    nn.quantize(model, group_size, bits, class_predicate=predicate)
    model.args.quantization = {"group_size": group_size, "bits": bits}
    return done
