"""Every example in README.md runs as written, in order, in one fresh folder.

Code blocks run in the order they appear: `bash` blocks with `bash -eo pipefail`, `python` blocks
with this interpreter, and a `yaml` block whose first line is `# NAME` is the file NAME the next
commands read. A block after `<!-- readme-test: background -->` is started and left running (a
server) until the end. The first block holds the two set-up commands: its install command must be
the one CI runs (same extras) and its test command exactly CI's; its generate command runs.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"
BLOCK = re.compile(r"(?:<!-- readme-test: (\w+) -->\n)?```(\w+)\n(.*?)\n```", re.S)


@dataclass
class Block:
    index: int
    language: str
    code: str
    mode: str | None  # None or "background"

    def __str__(self) -> str:
        first = self.code.splitlines()[0][:60]
        return f"{self.index}-{self.language}: {first}"


def readme_blocks() -> list[Block]:
    found = [Block(i, m[2], m[3], m[1]) for i, m in enumerate(BLOCK.finditer(README.read_text()))]
    return [b for b in found if b.language in ("bash", "python", "yaml")]


BLOCKS = readme_blocks()


def test_readme_is_a_short_guide():
    text = README.read_text()
    assert len(text.encode()) < 15_000
    assert not re.search(r"\bissues?\b", text, re.I)
    for link in re.findall(r"\]\(((?:docs|examples)/[^)#]+)", text):
        assert (ROOT / link).exists(), link


def test_set_up_commands_are_the_ones_ci_runs():
    install, tests = BLOCKS[0].code.splitlines()
    ci = CI.read_text()
    extras = re.search(r'pip install -e "\.\[([^\]]+)\]"', install)[1]
    ci_extras = re.search(r'pip install --quiet -e "\.\[([^\]]+)\]"', ci)[1]
    assert extras == ci_extras
    assert ci.rstrip().splitlines()[-1] == tests


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    background: list[subprocess.Popen] = []
    yield folder, background
    for p in background:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def run_bash(code: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-eo", "pipefail", "-c", code], cwd=cwd, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert process.poll() is None, log.read_text()[-3000:]
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"nothing listens on port {port}: {log.read_text()[-3000:]}")


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_readme_block_runs(block: Block, workdir):
    folder, background = workdir
    if block.index == BLOCKS[0].index:  # the set-up commands: run the generate part
        install = block.code.splitlines()[0]
        r = run_bash(install.split("&&", 1)[1], folder, 300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.strip() and "KV" in r.stderr
        return
    if block.language == "yaml":
        name = block.code.splitlines()[0].removeprefix("#").strip()
        assert name and "/" not in name, "a yaml block starts with `# FILE`"
        (folder / name).write_text(block.code + "\n")
        return
    if block.mode == "background":
        port = int(re.search(r"--port (\d+)", block.code)[1])
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port} is taken on this machine")
        log = folder / f"background-{block.index}.log"
        with open(log, "w") as out:
            p = subprocess.Popen(
                ["bash", "-c", "exec " + block.code.split("#")[0]], cwd=folder,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        background.append(p)
        wait_for_port(port, p, log)
        return
    if block.language == "python":
        r = subprocess.run([sys.executable, "-c", block.code], cwd=folder, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    else:
        r = run_bash(block.code, folder, 900)
    if r.returncode != 0 and "pip download" in block.code and not list(folder.glob("*/*.tar.gz")):
        pytest.skip(f"the package registry is not reachable: {r.stderr[-300:]}")
    assert r.returncode == 0, f"{shlex.quote(block.code)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
