"""Checkpoints of a training run: out_dir/checkpoints/step-NNNNNNN, each a model folder with
`optimizer.safetensors` and `trainer.json`.

A checkpoint is written whole into a hidden folder beside it (`.step-NNNNNNN.partial-PID`) and
then renamed, so a folder named step-* is complete unless damaged later; hidden folders left by a
killed process are removed by the next run. Reading tries the newest first and skips (saying so)
those that do not load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from ham_mlx.model import Model
from ham_mlx.model_io import load_model, save_model
from ham_mlx.processes import running
from ham_mlx.tokenizer import Tokenizer

OPTIMIZER = "optimizer.safetensors"
TRAINER = "trainer.json"
PAUSE_ENV = "HAM_MLX_CHECKPOINT_PAUSE"  # seconds slept between a checkpoint's files (kill tests)
HIDDEN = re.compile(r"^\.+step-\d+\.(?:partial|old)-(\d+)(?:\.|$)")


@dataclass
class Checkpoint:
    path: Path
    step: int
    model: Model
    optimizer: dict[str, mx.array]


def name(step: int) -> str:
    return f"step-{step:07d}"


def _pause() -> None:
    seconds = float(os.environ.get(PAUSE_ENV) or 0)
    if seconds > 0:
        time.sleep(seconds)


def write(
    root: Path, step: int, model: Model, optimizer: dict[str, mx.array], state: dict[str, Any],
    tokenizer: Tokenizer | None, keep: int,
) -> Path:  # fmt: skip
    """Write root/step-NNNNNNN in one rename, then keep only the newest `keep` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / name(step)
    tmp = root / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_model(model, tmp, tokenizer)
        _pause()
        mx.save_safetensors(str(tmp / OPTIMIZER), optimizer)
        _pause()
        (tmp / TRAINER).write_text(json.dumps(state, indent=2) + "\n")
        _pause()
        if path.exists():  # a checkpoint of this step from an earlier run: replace it
            old = root / f".{path.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for p in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    return path


def remove_stale(root: Path) -> None:
    """Remove the hidden folders of checkpoints whose writer is no longer running."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        m = HIDDEN.match(p.name)
        if m and p.is_dir() and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    return pid == os.getpid() or running(pid)


def read(path: Path, expected: set[str]) -> Checkpoint:
    """One checkpoint; ValueError naming the file when it is incomplete or damaged.
    `expected`: the optimizer state's keys."""
    try:
        state = json.loads((path / TRAINER).read_text())
        step = state["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"{TRAINER}: step={step!r}")
        optimizer = mx.load(str(path / OPTIMIZER))
        mx.eval(list(optimizer.values()))
        if set(optimizer) != expected:
            raise ValueError(f"{OPTIMIZER}: not this optimizer's state")
        model = load_model(path)
    except FileNotFoundError as e:
        raise ValueError(f"{Path(e.filename).name if e.filename else e} is missing") from None
    except Exception as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None
    return Checkpoint(path, step, model, optimizer)


def newest(root: Path, expected: set[str]) -> Checkpoint | None:
    """The newest checkpoint that loads; the broken ones before it are named on stderr."""
    for path in sorted(root.glob("step-*"), reverse=True):
        try:
            return read(path, expected)
        except ValueError as e:
            print(f"ham-mlx train: skipping the broken checkpoint {path}: {e}", file=sys.stderr)
    return None
