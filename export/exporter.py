"""`export_onnx`: write a model folder's ONNX export (fp32, fp16, or 8-/4-bit weights), optionally
as an onnxruntime-genai folder, check it, and report its parity with the MLX model."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ham_mlx.hf_tokenizer import write_hf_tokenizer
from ham_mlx.json_tokenizer import HF_CONFIG, HF_TOKENIZER, JsonTokenizer
from ham_mlx.model import Model, per_layer
from ham_mlx.tokenizer import Tokenizer

from .build import build_model
from .genai import write_genai_config
from .parity import compare, report_line
from .quantize import ACCURACY_LEVEL, BITS, BLOCK_SIZE, KEEP_FLOAT, quantize_weights
from .runtime import MODEL_FILE, TOKENIZER_FILE, OnnxModel

DATA_FILE = MODEL_FILE + ".data"
QUANTIZE = tuple(BITS)  # "int8", "int4": MatMulNBits weights (export/quantize.py)
REPORT_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
)
MIN_TOP1 = 0.97  # parity below this top-1 agreement with MLX, or any admission flip, warns


class ParityWarning(UserWarning):
    """The export's parity report is under the thresholds (top-1 agreement, admission flips)."""


@dataclass
class ExportResult:
    path: Path
    report: dict[str, Any] = field(default_factory=dict)  # parity with the MLX model
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


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


def publish_modes(folder: Path) -> None:
    """Give the folder and its files the modes a plain mkdir / open would under the process's
    umask (0755 / 0644 with the usual 022), like every other folder ham-mlx writes:
    tempfile.mkdtemp makes the folder 0700, and onnx writes external data 0600."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.rglob("*"):
        f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)


def export_onnx(
    model: str | os.PathLike[str] | Model,
    out_dir: str | os.PathLike[str],
    tokenizer: Tokenizer | JsonTokenizer | None = None,
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
    buffer to max_length instead). dtype "fp32" | "fp16"; quantize "int8" | "int4": block-wise
    weights in onnxruntime's MatMulNBits (export/quantize.py; from fp32). genai: also write
    genai_config.json (context_length = max_length), tokenizer.json and tokenizer_config.json, with
    the cache layout genai can allocate. report: compare the export with the MLX model (logits,
    admission decisions), write parity.json, and warn (`ParityWarning`, and a line in `lines`)
    when top-1 agreement falls under 97% or an admission decision flips.
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
        raise ValueError(f"{quantize} weights are quantized from the fp32 graph: use dtype='fp32'")
    if max_kv_tokens is not None and max_kv_tokens < 1:
        raise ValueError(f"max_kv_tokens={max_kv_tokens} must be a positive integer")
    if genai and tokenizer is None:
        raise ValueError("an onnxruntime-genai folder needs the tokenizer")
    taus = None
    if threshold is not None:
        taus = [float(t) for t in per_layer(threshold, len(model.ham_layers), "threshold")]
    proto, ios = build_model(model, taus, dtype, "genai" if genai else "compact", debug_outputs)
    quantized = []
    if quantize is not None:
        proto, quantized = quantize_weights(proto, BITS[quantize])
    meta = {"ham.max_kv_tokens": json.dumps(max_kv_tokens), "ham.quantize": json.dumps(quantize)}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_onnx(proto, tmp)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        if genai:
            write_genai_config(tmp, model.args, ios, context_length)
            if (tmp / TOKENIZER_FILE).is_file():
                write_hf_tokenizer(tmp / TOKENIZER_FILE, tmp)
        result = ExportResult(out)
        if report:
            result.report, line = parity_report(
                model, tokenizer, tmp, dtype, quantize, max_kv_tokens
            )
            result.lines.append(line)
            if quantize is not None:
                result.report["quantization"] = quantization_summary(quantize, quantized)
            result.warnings = parity_warnings(result.report)
            result.report["warnings"] = result.warnings
            result.lines += [f"warning: {w}" for w in result.warnings]
            (tmp / "parity.json").write_text(json.dumps(result.report, indent=2) + "\n")
        publish_modes(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for w in result.warnings:
        warnings.warn(f"{out}: {w}", ParityWarning, stacklevel=2)
    if verbose:
        for line in result.lines:
            print(line)
    return result


def parity_warnings(report: dict[str, Any]) -> list[str]:
    """What falls short in a parity report: top-1 agreement under MIN_TOP1, admission flips."""
    found = []
    if report["top1_agreement"] < MIN_TOP1:
        found.append(
            f"top-1 agreement with MLX {100 * report['top1_agreement']:.1f}% is under "
            f"{100 * MIN_TOP1:.0f}%"
        )
    if report["admission_flips"]:
        found.append(
            f"{report['admission_flips']} of {report['decisions']} HAM admission decisions differ "
            "from MLX (a flipped token changes that row's cache for the rest of the sequence)"
        )
    return found


def quantization_summary(quantize: str, tensors: list) -> dict[str, Any]:
    """parity.json's record of the quantized weights: the scheme, and each tensor's relative
    weight error ||W - dequantized|| / ||W||."""
    return {
        "op": "com.microsoft.MatMulNBits",
        "bits": BITS[quantize],
        "block_size": BLOCK_SIZE,
        "accuracy_level": ACCURACY_LEVEL,
        "kept_float": list(KEEP_FLOAT),
        "tensors": [
            {"name": t.name, "shape": list(t.shape), "bits": t.bits,
             "relative_error": round(t.relative_error, 6)}
            for t in tensors
        ],  # fmt: skip
    }


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


def save_tokenizer(tokenizer: Tokenizer | JsonTokenizer, folder: Path) -> None:
    """A SentencePiece tokenizer as tokenizer.model; a tokenizer.json one as the files it was
    read from (tokenizer.json and, when there is one, tokenizer_config.json)."""
    if isinstance(tokenizer, Tokenizer):
        tokenizer.save(folder / TOKENIZER_FILE)
        return
    source = Path(tokenizer.source).parent
    for name in (HF_TOKENIZER, HF_CONFIG):
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
