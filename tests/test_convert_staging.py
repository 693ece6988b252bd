"""Conversions stopped by signals leave no staging folders: SIGTERM and SIGINT remove theirs, and
the folder of a SIGKILLed conversion is removed by the next one into the same destination (only
folders that are provably a dead conversion's)."""

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ham_mlx.convert import convert
from ham_mlx.convert.staging import MARKER, PAUSE_ENV

FLA = Path(__file__).parent / "fixtures" / "fla"


def default_sigint() -> None:
    """A shell's background job ignores SIGINT, and its children inherit that: the child
    conversion gets the default back (Python then raises KeyboardInterrupt on it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_and_signal(tmp_path: Path, sig: int) -> int:
    """`ham-mlx convert` in a subprocess, sent `sig` while its staging folder exists."""
    env = os.environ | {PAUSE_ENV: "30"}
    cmd = [sys.executable, "-m", "ham_mlx.cli", "convert", str(FLA / "gdn"), str(tmp_path / "out")]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=default_sigint
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(f".out.converting.*/{MARKER}")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    return proc.wait(timeout=30)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_stopped_conversion_removes_its_staging_folder(tmp_path, sig):
    assert start_and_signal(tmp_path, sig) == 128 + sig
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_next_conversion_removes_what_a_killed_one_left(tmp_path):
    assert start_and_signal(tmp_path, signal.SIGKILL) == -signal.SIGKILL
    (stale,) = tmp_path.glob(".out.converting.*")
    alive = tmp_path / ".out.converting.alive"  # a conversion that is still running
    alive.mkdir()
    (alive / MARKER).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    unmarked = tmp_path / ".out.converting.mine"  # looks alike, but nothing says it is ours
    unmarked.mkdir()
    other = tmp_path / ".other.converting.x"  # another destination's
    other.mkdir()
    (other / MARKER).write_text((stale / MARKER).read_text())  # a dead process's marker
    convert(FLA / "gdn", tmp_path / "out")
    assert not stale.exists()
    assert alive.is_dir() and unmarked.is_dir() and other.is_dir()
    assert (tmp_path / "out" / "config.json").is_file()
