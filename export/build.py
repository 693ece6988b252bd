"""Assemble the ONNX graph of a `ham_mlx.Model`: inputs, the lowered model, outputs, metadata.

One graph serves prompt and generation: `input_ids [batch, sequence]` (sequence >= 1),
`attention_mask [batch, total_sequence_length]` (onnxruntime-genai's input: 1 for a real token,
0 for a pad; the graph reads its last `sequence` columns, the current call's), `position_ids
[batch, sequence]` (models with attention layers: each real token's position in its row) plus the
past cache tensors in, `logits [batch, sequence, vocab]` (float32) plus the present tensors out.
Left padding (only on a row that has seen nothing) and right padding are both honoured: pads
never reach a state or a cache (spec §7.1).
"""

from __future__ import annotations

import json

import numpy as np
import onnx

from ham_mlx.model import Model

from .cache_io import LayerIO, layer_ios
from .graph import BOOL, FLOAT, INT64, Graph, onnx_type
from .lower import ROUTER_LOWERINGS, Context, LayerCache, UnsupportedFeature, lower

DTYPES = {"fp32": np.float32, "fp16": np.float16}
THRESHOLDS = "ham_thresholds"
MASK = "attention_mask"


def check_supported(model: Model) -> None:
    """Fail early, naming the feature, on what the lowering cannot express."""
    args = model.args
    if args.ham_layers and args.ham_router not in ROUTER_LOWERINGS:
        raise UnsupportedFeature(f"ham_router={args.ham_router!r} has no ONNX lowering")
    for i, layer in enumerate(model.layers):
        if layer.layer_type not in ("ham", "gdn", "attn"):
            raise UnsupportedFeature(f"model.layers.{i}: layer type {layer.layer_type!r}")


def build_model(
    model: Model,
    thresholds: list[float] | None = None,
    dtype: str = "fp32",
    layout: str = "compact",
    debug_outputs: bool = True,
) -> tuple[onnx.ModelProto, list[LayerIO]]:
    """The ONNX model of `model` (weights inline; `save` moves them to external data).

    thresholds: one τ per HAM layer (default: the model's trained thresholds), baked in as the
    constant `ham_thresholds`. dtype: "fp32" or "fp16" (weights and
    activations; the recurrence, scores and logits stay float32). layout: see cache_io.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    check_supported(model)
    ios = layer_ios(model, layout)
    taus = model.thresholds() if thresholds is None else [float(t) for t in thresholds]
    if len(taus) != len(model.ham_layers):
        raise ValueError(f"{len(taus)} thresholds given for {len(model.ham_layers)} HAM layers")

    g = Graph("ham", DTYPES[dtype])
    cache_type = onnx_type(DTYPES[dtype])
    ids = g.input("input_ids", INT64, ["batch", "sequence"])
    mask = g.input(MASK, INT64, ["batch", "total_sequence_length"])
    positions = None
    if any(io.kind == "attn" for io in ios):
        positions = g.input("position_ids", INT64, ["batch", "sequence"])
    tau = g.initializer(THRESHOLDS, np.array(taus, dtype=np.float32)) if taus else None
    caches = []
    for io in ios:
        c = LayerCache(io)
        for slot in io.slots:
            elem = cache_type if slot in ("key", "value") else FLOAT
            c.past[slot] = g.input(
                io.past(slot), elem, io.shape(slot, "batch", f"capacity_{io.index}")
            )
        caches.append(c)

    with g.scope("padding"):  # the current call's columns of the mask, as bool [B, L]
        L = g.dim(ids, 1)
        valid = g.Cast(g.Slice(mask, g.Neg(L), g.i64([2**62]), g.i64([1])), to=BOOL)
    ctx = Context(g, tau, positions, caches, valid=valid)
    logits = lower(ctx, model, ids, name=None)
    g.output(g.to_f32(logits), "logits", FLOAT, ["batch", "sequence", model.args.vocab_size])
    for io, c in zip(ios, caches):
        for slot in io.slots:
            elem = cache_type if slot in ("key", "value") else FLOAT
            shape = io.shape(slot, "batch", f"capacity_{io.index}")
            g.output(c.present[slot], io.present(slot), elem, shape)
    if debug_outputs:
        for io, c in zip(ios, caches):
            if io.kind == "ham":
                g.output(
                    c.debug["surprise"], f"debug.{io.index}.surprise", FLOAT, ["batch", "sequence"]
                )
                g.output(
                    c.debug["admitted"], f"debug.{io.index}.admitted", BOOL, ["batch", "sequence"]
                )

    metadata = {
        "ham.config": json.dumps(model.args.to_dict()),
        "ham.thresholds": json.dumps(taus),
        "ham.layout": layout,
        "ham.dtype": dtype,
        "ham.layers": json.dumps([io.kind for io in ios]),
    }
    doc = (
        "HAM language model exported by ham_mlx.export: one graph for prompt and generation; "
        "capacity of each cache is the past buffer's sequence dimension."
    )
    return g.make_model(doc, metadata), ios
