"""Find and open the weights of an HF-style checkpoint folder: one name -> LazyTensor map.

Looked for in this order (the first that exists wins):
`model.safetensors.index.json` (+ shards), `model.safetensors`, `pytorch_model.bin.index.json`
(+ shards), `pytorch_model.bin`, else the only `*.safetensors` / `*.bin` / `*.pt` / `*.pth` file.
An index may name only files inside the folder (`ham_mlx.folder_files`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ham_mlx.convert.safetensors_io import read_safetensors
from ham_mlx.convert.tensors import ConversionError, LazyTensor
from ham_mlx.convert.torch_zip import read_torch_zip
from ham_mlx.folder_files import read_index

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "module")  # nested state dicts
STRIPPED_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def weight_files(src: Path) -> list[Path]:
    """The weight files of a checkpoint folder (or the file itself), in reading order."""
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise ConversionError(f"{src}: no such checkpoint folder or file")
    for name in (SAFETENSORS_INDEX, "model.safetensors", TORCH_INDEX, "pytorch_model.bin"):
        if (src / name).is_file():
            return index_files(src / name) if name.endswith(".json") else [src / name]
    found = sorted(p for p in src.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(found) == 1:
        return found
    if not found:
        raise ConversionError(
            f"{src}: no weights found (model.safetensors, pytorch_model.bin, an index of shards, "
            "or one *.safetensors / *.bin / *.pt / *.pth file)"
        )
    names = ", ".join(p.name for p in found)
    raise ConversionError(f"{src}: several weight files and no index to say which: {names}")


def index_files(index: Path) -> list[Path]:
    """The shards an index names, each inside the index's folder (`ham_mlx.folder_files`)."""
    files = sorted(set(read_index(index, ConversionError).values()))
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise ConversionError(
            f"{missing[0]}: shard named by {index.name} is missing "
            f"({len(missing)} of {len(files)} shards missing)"
        )
    return files


def read_file(path: Path) -> dict[str, LazyTensor]:
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return state_dict(read_torch_zip(path), path)


def state_dict(obj: Any, path: Path) -> dict[str, LazyTensor]:
    """The flat name -> tensor dict inside a torch checkpoint object (possibly nested under
    "state_dict", "model", ...), with DDP / torch.compile prefixes removed."""
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, LazyTensor) for v in obj.values()):
            break
        inner = [
            k for k in STATE_DICT_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)
        ]
        if not inner:
            break
        obj = obj[inner[0]]
    if not isinstance(obj, dict) or not obj:
        raise ConversionError(f"{path}: no state dict of tensors found")
    out = {}
    for key, t in obj.items():
        if not isinstance(t, LazyTensor):
            raise ConversionError(
                f"{path}: entry {key!r} is a {type(t).__name__}, not a tensor "
                f"(top-level keys: {sorted(map(str, obj))[:8]})"
            )
        name = strip_prefixes(str(key))
        t.name = name
        out[name] = t
    return out


def strip_prefixes(name: str) -> str:
    for prefix in STRIPPED_PREFIXES:
        name = name.removeprefix(prefix)
    return name


def read_weights(src: str | Path) -> tuple[dict[str, LazyTensor], list[Path]]:
    """All tensors of a checkpoint (folder or file) by name, and the files they came from."""
    files = weight_files(Path(src))
    tensors: dict[str, LazyTensor] = {}
    for f in files:
        if f.suffix not in WEIGHT_SUFFIXES:
            raise ConversionError(f"{f}: unknown weight file type (expected {WEIGHT_SUFFIXES})")
        for name, t in read_file(f).items():
            if name in tensors:
                raise ConversionError(f"{f}: tensor {name!r} is also in {tensors[name].file}")
            tensors[name] = t
    index = files[0].parent / (
        SAFETENSORS_INDEX if files[0].suffix == ".safetensors" else TORCH_INDEX
    )
    if Path(src).is_dir() and index.is_file():
        for key, file in read_index(index, ConversionError).items():
            name = strip_prefixes(key)
            if name not in tensors or Path(tensors[name].file) != file:
                rel = file.relative_to(index.parent)
                raise ConversionError(f"{index}: names {name!r} in {rel}, which lacks it")
    return tensors, files
