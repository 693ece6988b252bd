"""Measure `ham-mlx serve` with several clients at once against the same requests one at a time.

    python tests/scripts/serve_concurrency.py [--clients 6] [--max-tokens 128] [--model DIR]

Starts a server (prefix reuse off unless asked: only batching differs between the runs), sends one
warm-up request, then the same greedy requests (one distinct prompt per client) first serially,
then all at once from one thread per client, and prints wall time, completion tokens and tokens
per second of both, and whether every concurrent answer equals its serial one.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

PROMPTS = [
    "To be, or not to be, that is the question:",
    "Now is the winter of our discontent",
    "O Romeo, Romeo, wherefore art thou Romeo?",
    "Friends, Romans, countrymen, lend me your ears;",
    "All the world's a stage, and all the men and women merely players;",
    "Is this a dagger which I see before me,",
    "If music be the food of love, play on;",
    "The quality of mercy is not strain'd;",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask(url: str, prompt: str, max_tokens: int) -> tuple[str, int]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    out = r.json()
    return out["choices"][0]["text"], out["usage"]["completion_tokens"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--prefix-cache-mb", default="0",
                   help="the server's prefix reuse (default 0: off, so that only batching "
                   "differs between the runs)")  # fmt: skip
    a = p.parse_args()
    if not 1 <= a.clients <= len(PROMPTS):
        p.error(f"--clients: 1..{len(PROMPTS)}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "ham_mlx.cli",
        "serve",
        "--port",
        str(port),
        "--prefix-cache-mb",
        a.prefix_cache_mb,
        "--max-batch",
        str(a.clients),
    ] + (["--model", a.model] if a.model else [])
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve_concurrency_{port}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                print(log.read_text(), file=sys.stderr)
                return 1
            time.sleep(0.1)
        prompts = PROMPTS[: a.clients]
        ask(url, "Warm up", 8)

        start = time.perf_counter()
        serial = [ask(url, q, a.max_tokens) for q in prompts]
        serial_s = time.perf_counter() - start

        start = time.perf_counter()
        with ThreadPoolExecutor(a.clients) as pool:
            concurrent = list(pool.map(lambda q: ask(url, q, a.max_tokens), prompts))
        concurrent_s = time.perf_counter() - start
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)

    cpu = platform.processor()
    if Path("/proc/cpuinfo").is_file():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [x for x in lines if x.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    print(f"machine: {platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")  # fmt: skip
    print(f"model: {a.model or 'bundled default'}; {a.clients} clients, greedy, max_tokens "
          f"{a.max_tokens}, --prefix-cache-mb {a.prefix_cache_mb}")  # fmt: skip
    for name, runs, seconds in (("serial", serial, serial_s), ("concurrent", concurrent,
                                                               concurrent_s)):  # fmt: skip
        tokens = sum(n for _, n in runs)
        print(f"{name:>10}: {seconds:7.2f} s wall, {tokens} completion tokens, "
              f"{tokens / seconds:7.1f} tok/s")  # fmt: skip
    same = [s[0] == c[0] for s, c in zip(serial, concurrent)]
    print(f"speed-up {serial_s / concurrent_s:.2f}x; concurrent answers equal serial: "
          f"{sum(same)}/{len(same)}")  # fmt: skip
    return 0 if all(same) else 1


if __name__ == "__main__":
    sys.exit(main())
