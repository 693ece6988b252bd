"""Model folders: `config.json`, `model.safetensors` (or shards + index), `tokenizer.model`
(+ `tokenizer.json` and `tokenizer_config.json` for Hugging Face tooling), and `ham_model.py`, the
module that `config.json`'s `model_file` names for mlx-lm (`mlx_lm.load(folder,
trust_remote_code=True)` and mlx-lm's console scripts with `--trust-remote-code`).

`config.json` holds `ModelArgs.to_config()`: the mixer of each layer is under `mixer_types`
(transformers validates a `layer_types` key); a folder with the old `layer_types` key still reads,
with a one-line deprecation message.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ham_mlx.config import ModelArgs, config_fields
from ham_mlx.folder_files import read_index
from ham_mlx.hf_tokenizer import CHAT_TEMPLATE, write_hf_tokenizer
from ham_mlx.json_tokenizer import JsonTokenizer
from ham_mlx.model import Model
from ham_mlx.safetensors_header import read_header
from ham_mlx.tokenizer import Tokenizer, load_tokenizer

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.model"
MODEL_FILE = "ham_model.py"  # config.json's `model_file`: mlx-lm's hook for outside architectures
MODEL_FILE_SOURCE = '''"""mlx-lm's `model_file` for this model folder (config.json names it).

`mlx_lm.load(folder, trust_remote_code=True)` and mlx-lm's console scripts with
`--trust-remote-code` import it to build the model; the code is the installed ham_mlx package
(pip install ham-mlx), this file only points there.
"""

from ham_mlx.mlx_lm_model import Model, ModelArgs  # noqa: F401
'''
MAX_SHARD_BYTES = 2 * 1024**3
FLOAT_WEIGHTS = (mx.float32, mx.float16, mx.bfloat16)


class CheckpointError(ValueError):
    """A model folder or weight file that cannot be loaded."""


def read_config(path: str | Path) -> ModelArgs:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: not found (is {path} a model folder?)")
    try:
        params = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{file}: invalid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(params, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    try:
        return ModelArgs.from_dict(config_fields(params, source=str(file)))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: {e}") from e


def folder_config(args: ModelArgs, thresholds: list[float] | None = None) -> dict[str, Any]:
    """The `config.json` dict of a model folder: `args.to_config()`, the trained thresholds, and
    `model_file` for mlx-lm."""
    config = args.to_config()
    config["ham_threshold"] = thresholds or config["ham_threshold"]
    config["model_file"] = MODEL_FILE
    return config


def write_model_file(folder: str | Path) -> Path:
    """Write the folder's mlx-lm module (`ham_model.py`)."""
    file = Path(folder) / MODEL_FILE
    file.write_text(MODEL_FILE_SOURCE)
    return file


def update_folder(path: str | Path) -> list[str]:
    """Bring a folder written by an older ham_mlx up to date, in place: `config.json` with
    `mixer_types` and `model_file`, the `ham_model.py` module, `tokenizer.json` +
    `tokenizer_config.json` where the folder has only `tokenizer.model`, and the chat template in
    a `tokenizer_config.json` that has none. Weights are not touched. Returns the names of the
    files written."""
    path = Path(path)
    args = read_config(path)
    config = folder_config(args)
    written = []
    file = path / "config.json"
    if json.loads(file.read_text()) != config:
        tmp = path / ".config.json.tmp"
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, file)
        written.append(file.name)
    if not (path / MODEL_FILE).is_file() or (path / MODEL_FILE).read_text() != MODEL_FILE_SOURCE:
        written.append(write_model_file(path).name)
    tok_config = path / "tokenizer_config.json"
    if (path / TOKENIZER).is_file() and not (path / "tokenizer.json").is_file():
        write_hf_files(path / TOKENIZER, path)
        written += [n for n in ("tokenizer.json", tok_config.name) if (path / n).is_file()]
    elif tok_config.is_file() and not (path / "chat_template.jinja").is_file():
        fields = json.loads(tok_config.read_text())
        if isinstance(fields, dict) and "chat_template" not in fields:
            fields["chat_template"] = CHAT_TEMPLATE
            tok_config.write_text(json.dumps(fields, indent=2, ensure_ascii=False) + "\n")
            written.append(tok_config.name)
    return written


def read_weights(path: str | Path) -> dict[str, mx.array]:
    """All tensors of a folder's `model.safetensors` or of the shards its index names (files
    inside the folder only, `ham_mlx.folder_files`); each file's header is checked before MLX
    reads it (`ham_mlx.safetensors_header`)."""
    path = Path(path)
    index = path / INDEX
    if index.is_file():
        files = sorted(set(read_index(index, CheckpointError).values()))
    elif (path / WEIGHTS).is_file():
        files = [path / WEIGHTS]
    else:
        raise CheckpointError(f"{path}: no {WEIGHTS} or {INDEX}")
    weights: dict[str, mx.array] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: shard named by {INDEX} is missing")
        read_header(file, CheckpointError)
        try:
            weights.update(mx.load(str(file)))
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"{file}: cannot read safetensors ({e})") from e
    return weights


def check_dtypes(weights: dict[str, mx.array], quantized: bool, source: str) -> None:
    """Weights are floating point (float32, float16, bfloat16); in a quantized model the packed
    `.weight` of a layer with `.scales` is uint32."""
    for key, w in weights.items():
        if w.dtype in FLOAT_WEIGHTS:
            continue
        packed = key.endswith(".weight") and key.removesuffix("weight") + "scales" in weights
        if quantized and packed and w.dtype == mx.uint32:
            continue
        raise CheckpointError(
            f"{source}: weight {key!r} is {w.dtype}; weights must be floating point (float32, "
            "float16 or bfloat16)" + ("" if quantized else ", or quantized with a config entry "
                                      "`quantization`")
        )  # fmt: skip


def check_weights(model: Model, weights: dict[str, mx.array], source: str) -> None:
    """Every parameter present with its shape, and nothing else."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing weight {missing[0]!r} ({len(missing)} missing)")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected weight {unexpected[0]!r}")
    for key, w in weights.items():
        if tuple(w.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: weight {key!r} has shape {tuple(w.shape)}, "
                f"the config needs {tuple(expected[key].shape)}"
            )


def load_model(path: str | Path) -> Model:
    args = read_config(path)
    model = Model(args)
    weights = model.sanitize(read_weights(path))
    check_dtypes(weights, args.quantization is not None, str(path))
    if args.quantization is not None:  # quantize the skeleton where the file has scales
        q = args.quantization
        nn.quantize(model, q["group_size"], q["bits"],
                    class_predicate=lambda p, m: f"{p}.scales" in weights)  # fmt: skip
    check_weights(model, weights, str(path))
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model


def default_model_path() -> Path:
    """The small model shipped inside the package (see docs/training.md)."""
    return Path(__file__).parent / "assets" / "default-model"


def load(path: str | Path | None = None) -> tuple[Model, Tokenizer | JsonTokenizer]:
    """Load a model folder: (model, tokenizer). No path: the bundled default model. The tokenizer
    is the folder's SentencePiece `tokenizer.model`, else its `tokenizer.json`."""
    if path is None:
        path = default_model_path()
        if not (path / "config.json").is_file():
            raise CheckpointError(f"no model given and no default model is bundled at {path}")
    model = load_model(path)
    try:
        tokenizer = load_tokenizer(path)
    except FileNotFoundError:
        raise CheckpointError(
            f"{Path(path)}: no {TOKENIZER} and no tokenizer.json; a model folder needs its "
            "tokenizer (load_model reads the model alone)"
        ) from None
    if tokenizer.vocab_size > model.args.vocab_size:
        raise CheckpointError(
            f"{tokenizer.source}: {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{model.args.vocab_size}"
        )
    return model, tokenizer


def shard(weights: dict[str, mx.array], max_bytes: int) -> list[dict[str, mx.array]]:
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for key, w in weights.items():
        if shards[-1] and size + w.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = w
        size += w.nbytes
    return shards


def write_hf_files(tokenizer_file: Path, folder: Path) -> None:
    """`tokenizer.json` + `tokenizer_config.json` beside `tokenizer.model`, for mlx-lm,
    transformers and onnxruntime-genai; a tokenizer they cannot express gets a warning."""
    try:
        write_hf_tokenizer(tokenizer_file, folder)
    except ValueError as e:
        warnings.warn(f"no tokenizer.json written: {e}", stacklevel=3)


def save_model(
    model: Model,
    path: str | Path,
    tokenizer: Tokenizer | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write a model folder atomically (a temporary folder beside it, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model folder is not
    try:
        config = {**folder_config(model.args, model.thresholds()), **(extra_config or {})}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_model_file(tmp)
        weights = dict(tree_flatten(model.parameters()))
        shards = shard(weights, max_shard_bytes)
        meta = {"format": "mlx"}
        if len(shards) == 1:
            mx.save_safetensors(str(tmp / WEIGHTS), shards[0], metadata=meta)
        else:
            weight_map = {}
            for i, part in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                mx.save_safetensors(str(tmp / name), part, metadata=meta)
                weight_map.update({k: name for k in part})
            total = sum(w.nbytes for w in weights.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER)
            write_hf_files(tmp / TOKENIZER, tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
