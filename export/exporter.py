"""`export_onnx`: write a model folder's ONNX export (fp32, fp16 or dynamic int8), optionally as an
onnxruntime-genai folder, check it, and report its parity with the MLX model."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ham_mlx.hf_tokenizer import write_hf_tokenizer
from ham_mlx.model import Model, per_layer
from ham_mlx.tokenizer import Tokenizer

from .build import build_model
from .genai import write_genai_config
from .parity import compare, report_line
from .runtime import MODEL_FILE, TOKENIZER_FILE, OnnxModel

DATA_FILE = MODEL_FILE + ".data"
QUANTIZE = ("int8",)
REPORT_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
)


@dataclass
class ExportResult:
    path: Path
    report: dict[str, Any] = field(default_factory=dict)  # parity with the MLX model
    lines: list[str] = field(default_factory=list)


def save_onnx(proto: onnx.ModelProto, folder: Path) -> Path:
    """model.onnx + model.onnx.data (every tensor above 1 KiB as external data), then the full
    checker on the saved files."""
    path = folder / MODEL_FILE
    proto = onnx.ModelProto.FromString(proto.SerializeToString())  # onnx.save mutates its input
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=1024,
    )
    onnx.checker.check_model(str(path), full_check=True)
    return path


def quantize_int8(folder: Path) -> None:
    """Dynamic 8-bit weights for the MatMuls with a constant weight (onnxruntime.quantization).

    Only MatMul: the default op list would also rewrite ops it cannot handle. Unsigned 8-bit
    weights: signed ones saturate in the u8 x s8 products of x86 CPUs with AVX2 but no VNNI
    (measured here on a random `small` model: relative logit error 0.6 with s8, 0.27 with s8 and
    reduce_range, 0.05 with u8)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = folder / MODEL_FILE
    tmp = folder / "int8.onnx"
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's advice to pre-process
    try:
        quantize_dynamic(
            str(src),
            str(tmp),
            op_types_to_quantize=["MatMul"],
            weight_type=QuantType.QUInt8,
            per_channel=False,
            use_external_data_format=True,
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        logging.getLogger().setLevel(level)
    proto = onnx.load(str(tmp))
    for f in folder.iterdir():
        if f.name != TOKENIZER_FILE:
            f.unlink()
    save_onnx(proto, folder)


def export_onnx(
    model: str | os.PathLike[str] | Model,
    out_dir: str | os.PathLike[str],
    tokenizer: Tokenizer | None = None,
    threshold: float | list[float] | None = None,
    max_kv_tokens: int | None = None,
    dtype: str = "fp32",
    quantize: str | None = None,
    genai: bool = False,
    context_length: int = 4096,
    debug_outputs: bool = True,
    report: bool = True,
    verbose: bool = False,
) -> ExportResult:
    """Export a HAM model (a model folder, or a Model and its Tokenizer) to ONNX in out_dir.

    threshold: one τ or one per HAM layer, baked in instead of the trained thresholds.
    max_kv_tokens: the HAM layers' default capacity for `ham_mlx.export.runtime` (genai sizes every
    buffer to max_length instead). dtype "fp32" | "fp16"; quantize "int8" (dynamic, MatMul weights;
    from fp32). genai: also write genai_config.json (context_length = max_length), tokenizer.json
    and tokenizer_config.json, with the cache layout genai can allocate. report: compare the export
    with the MLX model (logits, admission decisions) and write parity.json.
    """
    from ham_mlx.model_io import load

    if isinstance(model, Model):
        source = None
    else:
        source = Path(model)
        model, tokenizer = load(source)
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r}: expected one of {QUANTIZE}")
    if quantize is not None and dtype != "fp32":
        raise ValueError("dynamic int8 quantization starts from the fp32 graph: use dtype='fp32'")
    if max_kv_tokens is not None and max_kv_tokens < 1:
        raise ValueError(f"max_kv_tokens={max_kv_tokens} must be a positive integer")
    if genai and tokenizer is None:
        raise ValueError("an onnxruntime-genai folder needs the tokenizer")
    taus = None
    if threshold is not None:
        taus = [float(t) for t in per_layer(threshold, len(model.ham_layers), "threshold")]
    proto, ios = build_model(model, taus, dtype, "genai" if genai else "compact", debug_outputs)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "ham.max_kv_tokens", json.dumps(max_kv_tokens)

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_onnx(proto, tmp)
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_FILE)
        if quantize == "int8":
            quantize_int8(tmp)
        if genai:
            write_genai_config(tmp, model.args, ios, context_length)
            write_hf_tokenizer(tmp / TOKENIZER_FILE, tmp)
        result = ExportResult(out)
        if report:
            result.report, line = parity_report(
                model, tokenizer, tmp, dtype, quantize, max_kv_tokens
            )
            result.lines.append(line)
            (tmp / "parity.json").write_text(json.dumps(result.report, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        for line in result.lines:
            print(line)
    return result


def parity_report(
    model: Model,
    tokenizer: Tokenizer | None,
    folder: Path,
    dtype: str,
    quantize: str | None,
    max_kv_tokens: int | None,
) -> tuple[dict, str]:
    """Compare the export in `folder` with the MLX model: a prompt fed in two chunks, then 64
    greedy tokens (teacher-forced)."""
    if tokenizer is not None:
        ids = np.array([tokenizer.encode(REPORT_TEXT)])
    else:
        ids = np.random.default_rng(0).integers(0, model.args.vocab_size, (1, 32))
    onnx_model = OnnxModel(folder)
    half = ids.shape[1] // 2
    r = compare(model, onnx_model, ids, [half, ids.shape[1] - half], 64, max_kv_tokens)
    size = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith(MODEL_FILE))
    name = quantize or dtype
    keep = (
        "tokens",
        "rows",
        "max_logit_error",
        "relative_logit_error",
        "admission_flips",
        "flips_outside_margin",
        "decisions",
        "top1_agreement",
    )
    summary = {k: r[k] for k in keep} | {"variant": name, "bytes": size}
    return summary, report_line(name, r, size)
