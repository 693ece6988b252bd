"""`convert(src, dst)`: a PyTorch checkpoint folder -> a ham_mlx model folder, atomically."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from ham_mlx.buffer_cache import SmallCache
from ham_mlx.config import MLX_LM_FIELDS, ConfigError, config_fields
from ham_mlx.convert import fla_keys, qwen35
from ham_mlx.convert.checkpoint import read_weights
from ham_mlx.convert.mapping import map_config, plan_weights
from ham_mlx.convert.progress import Progress
from ham_mlx.convert.quantize import quantize_model
from ham_mlx.convert.staging import staging_folder
from ham_mlx.convert.tensors import ConversionError
from ham_mlx.model import FP32_PARAMS, Model
from ham_mlx.model_io import TOKENIZER, save_model, write_hf_files
from ham_mlx.tokenizer import Tokenizer

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
SOURCE_DTYPES = {"F32": "float32", "F64": "float32", "F16": "float16", "BF16": "bfloat16"}
TOKENIZER_FILES = (
    TOKENIZER, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
    "chat_template.json",
)  # fmt: skip


@dataclass
class ConversionSummary:
    path: Path
    source_files: list[Path]
    parameters: int
    bytes: int
    layer_types: list[str]
    dtype: str
    quantization: dict[str, int] | None
    quantized_modules: int
    tokenizer_files: list[str] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)  # config keys that change no logits
    notes: list[str] = field(default_factory=list)  # source tensors left out, and why

    def __str__(self) -> str:
        types = " ".join(self.layer_types)
        q = "none"
        if self.quantization:
            q = (f"{self.quantization['bits']}-bit, group size {self.quantization['group_size']} "
                 f"({self.quantized_modules} layers)")  # fmt: skip
        tok = ", ".join(self.tokenizer_files) or "none found"
        lines = [
            f"converted    {', '.join(str(f) for f in self.source_files)}",
            f"into         {self.path}",
            f"parameters   {self.parameters:,}",
            f"layers       {len(self.layer_types)}: {types}",
            f"dtype        {self.dtype} (A_log, dt_bias, threshold in float32)",
            f"quantized    {q}",
            f"weights      {self.bytes / 1e6:.1f} MB",
            f"tokenizer    {tok}",
        ]
        if self.ignored_keys:
            keys = f"{', '.join(self.ignored_keys)} (config keys that change no forward pass)"
            lines.append(textwrap.fill(keys, 100, initial_indent="ignored      ",
                                       subsequent_indent=" " * 13))  # fmt: skip
        lines += [f"note         {n}" for n in self.notes]
        if not {TOKENIZER, "tokenizer.json"} & set(self.tokenizer_files):
            lines.append(
                f"note         no {TOKENIZER} and no tokenizer.json: ham_mlx.load needs one of "
                "them in the folder (ham_mlx.load_model reads the model alone)"
            )
        return "\n".join(lines)


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    overwrite: bool = False,
    progress: bool | None = None,
) -> ConversionSummary:
    """Convert a PyTorch checkpoint folder into a ham_mlx model folder.

    src: an HF-style folder with config.json (FLA `model_type: "gated_deltanet"`, Qwen3.5's
    `"qwen3_5"` / `"qwen3_5_text"`, or `"ham"`) and
    weights (`model.safetensors`, shards + index, `pytorch_model.bin`, or one `.pt`/`.pth`).
    dst: the folder to write; written into a temporary folder beside it, then renamed, so a
    failed or interrupted conversion leaves no partial dst. An existing dst is an error unless
    overwrite=True. dtype: "float32", "float16" or "bfloat16" (default: the checkpoint's);
    A_log, dt_bias and threshold stay float32. quantize: q_bits-bit weights in groups of
    q_group_size (mlx.nn.quantize). progress: a progress line on stderr (None: for large
    checkpoints).
    """
    with SmallCache():  # streaming: freed buffers go back at once (peak = the output)
        return _convert(src, dst, dtype, quantize, q_bits, q_group_size, overwrite, progress)


def _convert(src, dst, dtype, quantize, q_bits, q_group_size, overwrite, progress):
    src, dst = Path(src), Path(dst)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    if quantize and q_bits not in (4, 8):
        raise ConversionError(f"q_bits={q_bits}: expected 4 or 8")
    if quantize and q_group_size not in (32, 64, 128):
        raise ConversionError(f"q_group_size={q_group_size}: expected 32, 64 or 128")
    check_destination(src, dst, overwrite)
    folder = src if src.is_dir() else src.parent
    config_file = folder / "config.json"
    raw = source_config(read_json(config_file), config_file)
    source = qwen35 if qwen35.handles(raw) else None  # Qwen3.5 has a mapping of its own
    args = (source.map_config if source else map_config)(raw, str(config_file))
    tensors, files = read_weights(src)
    tokenizer_files = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
    if TOKENIZER in tokenizer_files:
        check_tokenizer(folder / TOKENIZER, args.vocab_size)
    elif "tokenizer.json" in tokenizer_files:
        check_json_tokenizer(folder, args.vocab_size)

    model = Model(args)  # lazy: the random initialisation is never computed
    plan = (source.plan_weights if source else plan_weights)(args, model, tensors)
    dtype = dtype or source_dtype(plan.sources)
    target = DTYPES[dtype]
    bar = Progress(sum(t.nbytes for t in plan.sources.values()), "reading weights", progress)
    weights = []
    for name, t in plan.sources.items():
        w = t.load()
        if name in plan.transpose:
            w = w.transpose(0, 2, 1)  # torch [C, 1, Kc] -> MLX [C, Kc, 1]
        w = w.astype(mx.float32 if name.split(".")[-1] in FP32_PARAMS else target)
        mx.eval(w)
        weights.append((name, w))
        bar.update(t.nbytes)
    bar.close()
    model.load_weights(weights, strict=True)
    del weights
    quantized: list[str] = []
    if quantize:
        quantized = quantize_model(model, q_bits, q_group_size)
    mx.eval(model.parameters())

    params = dict(tree_flatten(model.parameters()))
    write_atomically(dst, overwrite, lambda tmp: write_folder(model, tmp, folder, tokenizer_files))
    return ConversionSummary(
        path=dst, source_files=files,
        parameters=sum(count_parameters(k, v, model) for k, v in params.items()),
        bytes=sum(v.nbytes for v in params.values()), layer_types=list(args.layer_types),
        dtype=dtype, quantization=args.quantization, quantized_modules=len(quantized),
        tokenizer_files=tokenizer_files,
        ignored_keys=[] if source else fla_keys.ignored_keys(raw),
        notes=source.dropped(tensors) if source else [],
    )  # fmt: skip


def read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise ConversionError(f"{file}: not found (a checkpoint folder needs its config.json)")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ConversionError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConversionError(f"{file}: expected a JSON object")
    return raw


def source_config(raw: dict[str, Any], file: Path) -> dict[str, Any]:
    """A ham_mlx folder's config.json as `map_config` reads it: `mixer_types` under its field
    name `layer_types` (the old key logs a deprecation), without mlx-lm's folder keys
    (`model_file`: the destination gets its own)."""
    if raw.get("model_type") != "ham":
        return raw
    try:
        fields = config_fields(raw, source=str(file))
    except ConfigError as e:
        raise ConversionError(f"{file}: {e}") from None
    return {k: v for k, v in fields.items() if k not in MLX_LM_FIELDS}


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    s, d = src.resolve(), dst.resolve()
    if d == s or d in s.parents:
        raise ConversionError(f"{dst}: the destination would replace the source {src}")
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst}: already exists (pass overwrite=True / --overwrite)")
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"{dst}: exists and is not a folder")


def check_tokenizer(file: Path, vocab_size: int) -> None:
    try:
        tok = Tokenizer.from_file(file)
    except (ValueError, OSError) as e:
        raise ConversionError(str(e) if str(file) in str(e) else f"{file}: {e}") from None
    if tok.vocab_size > vocab_size:
        raise ConversionError(
            f"{file}: {tok.vocab_size} pieces but the model's vocab_size is {vocab_size}"
        )


def check_json_tokenizer(folder: Path, vocab_size: int) -> None:
    """tokenizer.json (with tokenizer_config.json's added tokens) must load and fit the
    embeddings: more ids than rows would fail at the first such token, long after conversion."""
    from ham_mlx.json_tokenizer import JsonTokenizer

    file = folder / "tokenizer.json"
    try:
        tok = JsonTokenizer.from_folder(folder)
    except (ValueError, OSError, KeyError) as e:
        raise ConversionError(str(e) if str(file) in str(e) else f"{file}: {e}") from None
    if tok.vocab_size > vocab_size:
        raise ConversionError(
            f"{file}: token ids up to {tok.vocab_size - 1} but the model's vocab_size is "
            f"{vocab_size}"
        )


def source_dtype(sources: dict) -> str:
    """The floating dtype that holds most of the checkpoint's bytes."""
    by_dtype: dict[str, int] = {}
    for name, t in sources.items():
        if name.split(".")[-1] not in FP32_PARAMS:
            by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
    if not by_dtype:
        return "float32"
    return SOURCE_DTYPES[max(by_dtype, key=lambda k: by_dtype[k])]


def count_parameters(name: str, w: mx.array, model: Model) -> int:
    """Parameters before quantization: packed uint32 words hold 32/bits weights; scales and
    biases are not parameters."""
    q = model.args.quantization
    if q is None:
        return w.size
    if name.endswith((".scales", ".biases")):
        return 0
    if w.dtype == mx.uint32:
        return w.size * 32 // q["bits"]
    return w.size


def write_folder(model: Model, tmp: Path, folder: Path, tokenizer_files: list[str]) -> None:
    save_model(model, tmp)
    for name in tokenizer_files:
        shutil.copyfile(folder / name, tmp / name)
    if TOKENIZER in tokenizer_files and "tokenizer.json" not in tokenizer_files:
        write_hf_files(tmp / TOKENIZER, tmp)


def write_atomically(dst: Path, overwrite: bool, write) -> None:
    """write(tmp) fills a temporary folder beside dst, which then becomes dst in one rename
    (an existing dst, when overwrite=True, is moved aside first and removed after)."""
    with staging_folder(dst) as staging:  # removed at the end, on SIGTERM, or by the next run
        write(staging / "out")
        if dst.exists():
            if not overwrite:
                raise ConversionError(f"{dst}: appeared during the conversion; not replaced")
            os.replace(dst, staging / "old")
        os.replace(staging / "out", dst)
