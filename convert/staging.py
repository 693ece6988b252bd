"""Staging folders of a conversion: `.NAME.converting.XXXXXXXX` beside the destination NAME, with
a marker file naming the writing process.

A staging folder is removed when its conversion ends, fails, or is stopped by SIGINT or SIGTERM;
one left by a killed process (SIGKILL, a crash) is removed by the next conversion into the same
destination. Only folders with the name pattern and a marker of a process on this machine that no
longer runs are removed: nothing else beside the destination is touched.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ham_mlx.processes import running

MARKER = "ham-mlx-staging.json"  # {"pid": ..., "host": ...}
PAUSE_ENV = "HAM_MLX_STAGING_PAUSE"  # seconds slept once the folder exists (kill tests)


def prefix(dst: Path) -> str:
    return f".{dst.name}.converting."


@contextmanager
def staging_folder(dst: Path) -> Iterator[Path]:
    """A fresh staging folder beside dst (stale ones of dst removed first), removed on exit."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dst)
    staging = Path(tempfile.mkdtemp(prefix=prefix(dst), dir=dst.parent))
    try:
        with terminate_as_exit():
            (staging / MARKER).write_text(json.dumps({"pid": os.getpid(), "host": _host()}))
            if seconds := float(os.environ.get(PAUSE_ENV) or 0):
                time.sleep(seconds)
            yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_stale(dst: Path) -> list[Path]:
    """Remove the staging folders of dst whose writer (on this machine) no longer runs."""
    removed = []
    for path in dst.parent.glob(glob.escape(prefix(dst)) + "*"):
        if path.is_symlink() or not path.is_dir():
            continue
        try:
            owner = json.loads((path / MARKER).read_text())
            pid, host = owner["pid"], owner["host"]
        except (OSError, ValueError, TypeError, KeyError):
            continue  # not provably ours
        if host == _host() and isinstance(pid, int) and pid > 0 and not running(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _host() -> str:
    return socket.gethostname()


class Terminated(SystemExit):
    """SIGTERM arrived: unwind (removing staging folders) and exit with 128 + SIGTERM."""


@contextmanager
def terminate_as_exit() -> Iterator[None]:
    """While inside, SIGTERM raises Terminated in the main thread (where it is handled) instead
    of ending the process at once; SIGINT already raises KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:  # someone else handles it
        yield
        return

    def raise_exit(sig: int, frame: object) -> None:
        raise Terminated(128 + sig)

    signal.signal(signal.SIGTERM, raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
