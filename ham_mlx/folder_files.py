"""File names that a model folder's own files give (the shards of a weight index): each must
name a file inside the folder.

A name is a relative path without `..` parts, resolved against the folder. Symbolic links are
judged by where the link is, not by its target: a link inside the folder is followed wherever it
points (the Hugging Face cache keeps a snapshot's files as links to `../../blobs/<hash>`), so a
folder is trusted as far as its owner made it; a name that leads out of the folder is not.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath


def folder_file(folder: Path, name: object, source: Path, error: type[Exception]) -> Path:
    """`folder / name`, where `source` (the file that gave the name) may only name files inside
    the folder; anything else raises `error` naming the source and the name."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise error(f"{source}: {name!r} is not a file name")
    parts = PurePosixPath(name).parts
    if (
        PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute()
        or PureWindowsPath(name).drive or ".." in parts or "\\" in name
    ):  # fmt: skip
        raise error(f"{source}: {name!r} names a file outside the model folder")
    return folder.joinpath(*parts)


def read_index(index: Path, error: type[Exception]) -> dict[str, Path]:
    """The `weight_map` of a shard index (`model.safetensors.index.json`,
    `pytorch_model.bin.index.json`): tensor name -> shard path inside the index's folder."""
    try:
        raw = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise error(f"{index}: invalid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise error(f"{index}: not a JSON object (a shard index has a weight_map)")
    if "weight_map" not in raw:
        raise error(f"{index}: no weight_map (tensor name -> shard file)")
    weight_map = raw["weight_map"]
    if not isinstance(weight_map, dict):
        raise error(f"{index}: weight_map must map tensor names to file names, got a "
                    f"{type(weight_map).__name__}")  # fmt: skip
    if not weight_map:
        raise error(f"{index}: weight_map is empty")
    out = {}
    for key, name in weight_map.items():
        where = f"{index}: weight_map[{key!r}]"
        if not isinstance(name, str) or not name:
            raise error(f"{where} = {name!r} is not a file name")
        out[key] = folder_file(index.parent, name, Path(where), error)
    return out
